"""Ahead-of-time TPU compilation of the trainer's own step (`python -m self_flow.aot`).

The TPU compiler (libtpu) is not a requirement of the CPU path, so these tests run the tool in
the separate environment that `launch/test.sh` prepares (`.venv-tpu`: this environment plus
the tpu extra), or in the interpreter named by SELF_FLOW_TPU_PYTHON. Without one they
are skipped, except under CI, where a missing TPU environment is a set-up error.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PYTHON = os.environ.get("SELF_FLOW_TPU_PYTHON",
                            os.path.join(REPO, ".venv-tpu", "bin", "python"))
SMALL = ["--config.model.compute_dtype=bfloat16", "--config.model.attention=splash",
         "--config.eval.batch_size=64"]


def _tpu_python() -> str:
  if os.path.exists(TPU_PYTHON):
    return TPU_PYTHON
  message = (f"no TPU compiler environment at {TPU_PYTHON}: launch/test.sh creates it "
             "(python -m venv .venv-tpu + the tpu extra)")
  if os.environ.get("CI"):
    pytest.fail(message)
  pytest.skip(message)


def run_aot(tmp_path, config: str, topology: str, *overrides: str):
  """(exit status, combined output, reports) of one `self_flow.aot` run."""
  report_path = tmp_path / "aot.json"
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
      [_tpu_python(), "-m", "self_flow.aot", f"--config={config}", f"--topology={topology}",
       f"--json={report_path}", *overrides],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  output = proc.stdout + proc.stderr
  reports = json.loads(report_path.read_text()) if report_path.exists() else []
  return proc.returncode, output, reports


@pytest.mark.parametrize("config", ["configs/c2i.py:local", "configs/t2i.py:local"])
def test_data_parallel_step_compiles_for_v5e_with_splash(tmp_path, config):
  hlo_dir = f"--hlo_dir={tmp_path / 'hlo'}"
  status, output, reports = run_aot(tmp_path, config, "v5e:2x2", *SMALL, hlo_dir)
  assert status == 0, output
  (report,) = reports
  assert report["device_kind"] == "TPU v5 lite" and report["num_devices"] == 4
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  # Pure data parallelism: every chip holds the whole state, so the arguments are at least the
  # state; outputs are the donated state again, aliased to the arguments.
  assert report["argument_bytes"] >= report["state_bytes"] > 0
  assert report["alias_bytes"] >= 0.99 * report["state_bytes"]
  assert 0 < report["total_bytes"] < report["hbm_bytes"] == 16 * 2**30 and report["fits"]
  assert report["temp_bytes"] > 0 and report["code_bytes"] > 0
  # Splash ran through Mosaic, not the interpreter; gradients are all-reduced, and no
  # parameter is gathered.
  assert report["tpu_kernels"] > 0
  assert report["collectives"]["all-reduce"]["bytes"] > 0
  assert "all-gather" not in report["collectives"]
  assert report["flops_per_device"] > 0 and report["compile_seconds"] > 0
  assert "fits" in output and "HBM" in output
  # The step-time band: the program's own cost, priced on v5e's public figures. Its FLOPs
  # (dots and convolutions, splash attention opaque) are near the analytic count.
  band = report["band"]
  assert 0.85 < report["hlo_flops_per_device"] / report["flops_per_device"] < 1.15
  assert band["compute"] == pytest.approx(
      max(report["hlo_flops_per_device"], report["flops_per_device"]) / 197e12)
  assert band["memory"] == pytest.approx(report["hbm_bytes_per_device"] / 819e9)
  assert report["hbm_bytes_per_device"] > 0
  assert band["communication"] > 0  # the gradients' all-reduce over the 4 chips
  assert band["lower"] == max(band["compute"], band["memory"], band["communication"])
  assert band["upper"] == pytest.approx(band["compute"] + band["memory"] + band["communication"])
  low_mfu, high_mfu = report["throughput"]["mfu"]
  assert 0 < low_mfu <= high_mfu <= 1
  assert "step-time band (a model of the compiled program, not a measurement)" in output
  assert "MFU" in output and "tokens/s/chip" in output
  # Re-priced from the saved JSON and HLO (no compile): the same report.
  status, output, repriced = run_aot(tmp_path, config, "v5e:2x2", *SMALL, hlo_dir, "--reprice")
  assert status == 0, output
  assert repriced == reports


def test_fsdp_tensor_layout_splits_the_state_and_gathers_weights(tmp_path):
  status, output, reports = run_aot(
      tmp_path, "configs/t2i.py:local", "v5p:2x2x2", *SMALL, "--config.mesh.data=1",
      "--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.mesh.rules=fsdp_tp")
  assert status == 0, output
  (report,) = reports
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert report["device_kind"] == "TPU v5" and report["hbm_bytes"] == 95 * 2**30
  # Parameters, EMA and Adam state split over 8 chips (the batch and a few small replicated
  # leaves on top): well under a quarter of the state per chip.
  assert report["argument_bytes"] < report["state_bytes"] / 4
  assert report["collectives"]["all-gather"]["executions"] > 0
  assert report["tpu_kernels"] > 0 and report["fits"]


def test_collective_matmul_switch_reaches_the_tpu_compiler(tmp_path):
  # A model wide enough, with enough rows per chip, that libtpu splits its FSDP-gathered
  # matmuls into loops over the weight shards (rings of collective-permutes); the config's
  # switch, passed as the train step's compiler options, makes it gather whole weights instead.
  wide = [*SMALL, "--config.mesh.data=1", "--config.mesh.fsdp=-1",
          "--config.model.hidden_size=768", "--config.model.num_heads=12",
          "--config.model.depth=2", "--config.model.num_double=1",
          "--config.model.student_layer=1", "--config.model.teacher_layer=2",
          "--config.model.rope_axes_dims=(16,24,24)", "--config.data.global_batch_size=128"]
  kinds = {}
  for switch in (True, False):
    status, output, reports = run_aot(tmp_path, "configs/t2i.py:local", "v5e:2x2", *wide,
                                      f"--config.mesh.collective_matmul={switch}")
    assert status == 0, output
    kinds[switch] = reports[0]["collectives"]
  assert kinds[True]["collective-permute"]["executions"] > 0
  assert "collective-permute" not in kinds[False]
  assert kinds[False]["all-gather"]["bytes"] > kinds[True]["all-gather"]["bytes"]


def test_two_slices_keep_fsdp_inside_a_slice(tmp_path):
  status, output, reports = run_aot(
      tmp_path, "configs/c2i.py:local", "v5e:2x2", "--num_slices=2", "--config.mesh.data=2",
      "--config.mesh.fsdp=-1", "--config.model.compute_dtype=bfloat16",
      "--config.eval.batch_size=64")
  assert status == 0, output
  (report,) = reports
  assert report["num_devices"] == 8 and report["num_slices"] == 2
  assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert report["argument_bytes"] < report["state_bytes"] / 2
  assert report["collectives"]["all-gather"]["executions"] > 0 and report["fits"]


def test_too_large_batch_fails_with_the_memory_knobs(tmp_path):
  status, output, reports = run_aot(tmp_path, "configs/c2i.py:local", "v5e:2x2",
                                    "--config.data.global_batch_size=65536",
                                    "--config.eval.batch_size=64")
  assert status == 1, output
  assert not reports[0]["fits"]
  assert "does not fit in HBM" in output
  for knob in ("mesh.fsdp", "mesh.tensor", "remat_policy", "train.microbatches",
               "global_batch_size"):
    assert knob in output


def test_unknown_topology_names_the_fix(tmp_path):
  status, output, _ = run_aot(tmp_path, "configs/c2i.py:local", "v5e:3x3x3x3")
  assert status != 0
  assert "--topology=v5e:3x3x3x3" in output and 'pip install -e ".[tpu]"' in output


def test_without_libtpu_the_tool_says_what_to_install():
  """The CPU environment has no libtpu (the tpu extra is separate): the tool stops with
  what to install instead of a traceback."""
  proc = subprocess.run([sys.executable, "-m", "self_flow.aot", "--config=configs/c2i.py:local",
                         "--topology=v5e:2x2"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'pip install -e ".[tpu]"' in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
