"""Where the trainer runs: the console progress line, the accelerator check, and the plan of
the notebooks' installer (launch/install_missing.py) for an environment that has its own jax."""

import fnmatch
import importlib.util
import os
import subprocess
import sys

import pytest

from self_flow import accelerators, reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _install_missing():
  spec = importlib.util.spec_from_file_location(
      "install_missing", os.path.join(REPO, "launch", "install_missing.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("step,steps_per_sec,expected", [
    (120, 0.5464, "step 120/1500 (8%) | loss 0.4123 | 1.83 s/step | ETA 42m06s"),
    (1000, 12.345, "step 1000/1500 (67%) | loss 0.4123 | 12.3 steps/s | ETA 41s"),
    (1, 0.0012, "step 1/1500 (0%) | loss 0.4123 | 833 s/step | ETA 346h59m"),
])
def test_progress_line_keeps_three_digits_of_the_rate(step, steps_per_sec, expected):
  assert reporting.progress_line(step, 1500, 0.41234, steps_per_sec) == expected


def _fake_devices(monkeypatch, paths):
  monkeypatch.setattr(accelerators.glob, "glob", lambda pattern: fnmatch.filter(paths, pattern))
  monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)


@pytest.mark.parametrize("paths,host,extra", [
    (["/dev/accel0", "/dev/accel1"], "tpu", "tpu"),
    (["/dev/vfio/0", "/dev/vfio/vfio"], "tpu", "tpu"),
    (["/dev/nvidia0", "/dev/nvidiactl"], "gpu", "cuda12"),
])
def test_an_accelerator_jax_does_not_use_is_named_with_its_extra(monkeypatch, paths, host, extra):
  _fake_devices(monkeypatch, paths)
  assert accelerators.host_accelerator() == host
  warning = accelerators.unused_accelerator_warning("cpu")
  assert f"has a {host.upper()}, but JAX sees only the CPU" in warning
  assert f'pip install -e ".[{extra}]"' in warning
  assert accelerators.unused_accelerator_warning(host) is None  # JAX uses it: nothing to say
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the CPU on purpose
  assert accelerators.unused_accelerator_warning("cpu") is None


def test_no_accelerator_no_warning(monkeypatch):
  _fake_devices(monkeypatch, ["/dev/vfio/vfio"])  # the VFIO control file alone is no TPU
  assert accelerators.host_accelerator() is None
  assert accelerators.unused_accelerator_warning("cpu") is None


def test_installer_pins_what_the_environment_has_and_keeps_its_tensorflow():
  install_missing = _install_missing()
  requirements = install_missing.read_requirements(os.path.join(REPO, "requirements.txt"))
  assert any(r.startswith("jax>=") for r in requirements)
  colab = {"jax": "0.12.0", "jaxlib": "0.12.0", "jax-cuda12-plugin": "0.12.0",
           "ipykernel": "6.17.1", "tornado": "6.4.2", "tensorflow": "2.19.0", "numpy": "2.0.2",
           "pandas": "2.2.2"}
  wanted, pins = install_missing.plan(requirements, colab)
  assert sorted(pins) == sorted(f"{n}=={v}" for n, v in colab.items() if n != "pandas")
  assert not [r for r in wanted
              if install_missing.requirement_name(r) in install_missing.TENSORFLOW_BUILDS]
  assert "flax>=0.12.8" in wanted and "jax>=0.10.2" in wanted  # satisfied, so pip keeps it
  wanted, pins = install_missing.plan(requirements, {"jax": "0.12.0"})  # no TensorFlow yet
  assert pins == ["jax==0.12.0"]
  assert any(install_missing.requirement_name(r) == "tensorflow-cpu" for r in wanted)


def test_installer_reads_an_extra_of_pyproject():
  install_missing = _install_missing()
  path = os.path.join(REPO, "pyproject.toml")
  assert install_missing.extra_requirements(path, "tpu") == ["jax[tpu]>=0.10.2"]
  with pytest.raises(ValueError, match="no extra 'gpu'"):
    install_missing.extra_requirements(path, "gpu")


def test_config_paths_outside_a_checkout_read_the_installed_configs(tmp_path):
  """`--config=configs/t2i.py:local` from a folder without configs/ reads the file of the
  importable `configs` package; a path that exists where the command runs is left alone."""
  script = ("import sys; from self_flow import main; "
            "print(main.with_installed_configs(sys.argv[1:]))")
  args = ["--config=configs/t2i.py:local", "--config=configs/own.py", "--workdir=w"]
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "own.py").write_text("")
  result = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": REPO},
                          check=True)
  assert result.stdout.strip() == str([
      f"--config={os.path.join(REPO, 'configs', 't2i.py')}:local", "--config=configs/own.py",
      "--workdir=w"])


@pytest.mark.parametrize("requested,batches,cores,expected", [
    (-1, (64, 256), 2, None),  # JAX's own setting
    (3, (64, 256), 2, 3),  # asked for: taken as is
    (0, (64, 256), 2, 2),  # one per core
    (0, (64, 256), 6, 4),  # 6 and 5 do not divide 64: the largest count <= 6 that does
    (0, (63, 256), 8, 1),  # nothing above 1 divides both
])
def test_cpu_device_count(requested, batches, cores, expected):
  assert accelerators.cpu_device_count(requested, batches, cores) == expected


def test_a_bad_cpu_device_count_is_named():
  with pytest.raises(ValueError, match=r"mesh.cpu_devices=-2.*-1 \(JAX's setting\)"):
    accelerators.cpu_device_count(-2, (64,), 2)


def test_main_splits_the_cpu_before_jax_starts(tmp_path):
  """`mesh.cpu_devices` reaches JAX before any backend starts: the run sees that many devices."""
  script = ("import sys, jax; from absl import app; from self_flow import main, train; "
            "train.train_and_evaluate = lambda config, workdir: print('devices', "
            "jax.device_count()) or {}; app.run(main.main, argv=sys.argv)")
  result = subprocess.run(
      [sys.executable, "-c", script, f"--config={REPO}/configs/c2i.py:local",
       "--config.mesh.cpu_devices=4", f"--workdir={tmp_path}"], cwd=tmp_path, text=True,
      capture_output=True, env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "devices 4" in result.stdout
