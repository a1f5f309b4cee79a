"""launch/tpu_pod.py: the gcloud commands of a v5p-64 run (dry run), input errors, and that a
failing step stops the rest. The script runs as a subprocess with `python -S` (no site-packages),
which also checks that it needs nothing beyond the standard library."""

import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch",
                      "tpu_pod.py")
SLICE = ("--name=sf-v5p", "--zone=us-east5-a")
CREATE = SLICE + ("--accelerator_type=v5p-64",)
RUN = SLICE + ("--workdir=gs://my-bucket/t2i", "--libtpu_preset=v5p_fsdp",
               "--config.data.data_dir=gs://my-bucket/shards", "--config.train.num_steps=400000")
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]
ZONE = "--zone=us-east5-a"
V5P_FSDP = ("--xla_enable_async_all_gather=true --xla_tpu_enable_async_collective_fusion=true "
            "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
            "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
            "--xla_tpu_overlap_compute_collective_tc=true "
            "--xla_tpu_enable_data_parallel_all_reduce_opt=true "
            "--xla_tpu_data_parallel_opt_different_sized_ops=true")
INSTALL_REMOTE = (
    "if ! command -v python3.11 >/dev/null; then sudo add-apt-repository -y ppa:deadsnakes/ppa"
    " && sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
    " python3.11 python3.11-venv; fi"
    " && mkdir -p ~/self_flow && tar -xzf /tmp/self_flow.tar.gz -C ~/self_flow"
    " && rm -f /tmp/self_flow.tar.gz && cd ~/self_flow"
    " && { [ -x .venv/bin/python ] || python3.11 -m venv .venv; }"
    " && .venv/bin/pip install -q --disable-pip-version-check -U pip"
    " && .venv/bin/pip install -q --disable-pip-version-check -c requirements-lock.txt -e '.[tpu]'")
RUN_REMOTE = (
    f"cd ~/self_flow && export LIBTPU_INIT_ARGS='{V5P_FSDP}'"
    " && .venv/bin/python -m self_flow.main --config=configs/t2i.py --workdir=gs://my-bucket/t2i"
    " --distributed --config.data.data_dir=gs://my-bucket/shards --config.train.num_steps=400000")


def launch(tmp_path, *args, env=None) -> subprocess.CompletedProcess:
  """Runs the launcher with TMPDIR=tmp_path, so the local archive path is known."""
  return subprocess.run([sys.executable, "-S", SCRIPT, *args], capture_output=True, text=True,
                        env={**os.environ, "TMPDIR": str(tmp_path), **(env or {})}, check=False)


def dry_run(tmp_path, *args) -> list[list[str]]:
  """The command lines a dry run prints (every line is marked; `#` lines are notes)."""
  result = launch(tmp_path, *args, "--dry_run")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines and all(line.startswith("[dry run] ") for line in lines), result.stdout
  commands = [line.removeprefix("[dry run] ") for line in lines]
  return [shlex.split(command) for command in commands if not command.startswith("#")]


def test_create_v5p_64(tmp_path):
  assert dry_run(tmp_path, "create", *CREATE, "--spot") == [
      TPU_VM + ["create", "sf-v5p", "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5",
                "--spot", ZONE]]


def test_create_queued_v5p_64(tmp_path):
  assert dry_run(tmp_path, "create", *CREATE, "--queued", "--spot", "--valid_until=6h",
                 "--project=my-project") == [
      QUEUED + ["create", "sf-v5p", "--node-id=sf-v5p", "--accelerator-type=v5p-64",
                "--runtime-version=v2-alpha-tpuv5", "--valid-until-duration=6h", "--spot", ZONE,
                "--project=my-project"]]


def test_install_copies_checkout_and_installs_pinned_jax_tpu(tmp_path):
  archive = str(tmp_path / "self_flow-sf-v5p.tar.gz")
  assert dry_run(tmp_path, "install", *SLICE) == [
      TPU_VM + ["scp", archive, "sf-v5p:/tmp/self_flow.tar.gz", "--worker=all", ZONE],
      TPU_VM + ["ssh", "sf-v5p", "--worker=all", f"--command={INSTALL_REMOTE}", ZONE]]


def test_run_with_preset_and_config_overrides(tmp_path):
  assert dry_run(tmp_path, "run", *RUN) == [
      TPU_VM + ["ssh", "sf-v5p", "--worker=all", f"--command={RUN_REMOTE}", ZONE]]


def test_run_detached_default_preset(tmp_path):
  [command] = dry_run(tmp_path, "run", *SLICE, "--workdir=gs://my-bucket/t2i/", "--detach")
  assert command[-2] == (
      "--command=cd ~/self_flow && { setsid nohup .venv/bin/python -m self_flow.main"
      " --config=configs/t2i.py --workdir=gs://my-bucket/t2i --distributed"
      " > ~/self_flow/train.log 2>&1 < /dev/null & }")


def test_encode_passes_the_encoder_flags_on_to_every_worker(tmp_path):
  """encode runs encode_captioned with --distributed and the given flags on all workers; other
  arguments (a config override, a positional) are refused, naming what is allowed."""
  [command] = dry_run(tmp_path, "encode", *SLICE, "--detach", "--source=webdataset",
                      "--inputs=gs://b/raw/{00000..00009}.tar", "--output_dir=gs://b/shards",
                      "--upscale_small")
  assert command[:7] == TPU_VM + ["ssh", "sf-v5p", "--worker=all"]
  assert command[-2] == (
      "--command=cd ~/self_flow && { setsid nohup .venv/bin/python -m "
      "self_flow.tools.encode_captioned --distributed --source=webdataset "
      "'--inputs=gs://b/raw/{00000..00009}.tar' --output_dir=gs://b/shards --upscale_small"
      " > ~/self_flow/encode.log 2>&1 < /dev/null & }")
  for bad in ("--config.seed=1x", "positional"):
    process = launch(tmp_path, "encode", *SLICE, "--dry_run", bad)
    assert process.returncode == 2
    assert "encode_captioned's flags (--name=value)" in process.stderr


def test_stop_and_delete(tmp_path):
  assert dry_run(tmp_path, "stop", *SLICE) == [
      TPU_VM + ["ssh", "sf-v5p", "--worker=all",
                "--command=pkill -TERM -f '[s]elf_flow[.]main'; "
                "while pgrep -f '[s]elf_flow[.]main' >/dev/null; do sleep 5; done", ZONE]]
  assert dry_run(tmp_path, "delete", *SLICE) == [TPU_VM + ["delete", "sf-v5p", ZONE]]
  assert dry_run(tmp_path, "delete", *SLICE, "--queued") == [
      QUEUED + ["delete", "sf-v5p", ZONE, "--force"]]


def test_up_is_create_wait_install_run(tmp_path):
  up = dry_run(tmp_path, "up", *CREATE, *RUN[2:], "--queued", "--spot")
  assert up == (
      dry_run(tmp_path, "create", *CREATE, "--queued", "--spot")
      + [QUEUED + ["describe", "sf-v5p", "--format=value(state.state)", ZONE]]
      + dry_run(tmp_path, "install", *SLICE) + dry_run(tmp_path, "run", *RUN))


@pytest.mark.parametrize("args,message", [
    (("create", "--name=sf", "--zone=us-east5-a", "--accelerator_type=v5e-16"),
     r"'v5e-16' is not a supported accelerator type: expected one of .*v5p-N.*v5litepod"),
    (("create", "--name=sf", "--zone=us-east5-a", "--accelerator_type=v5p64"),
     r"'v5p64' is not a supported accelerator type"),
    (("create", "--name=Sf_1", "--zone=us-east5-a", "--accelerator_type=v5p-64"),
     r"'Sf_1' is not a valid TPU name: use 1-63 lower-case letters"),
    (("create", "--name=sf", "--zone=us-east5", "--accelerator_type=v5p-64"),
     r"'us-east5' is not a zone"),
    (("create", *CREATE, "--queued", "--preemptible"),
     r"--preemptible is not available for queued resources: use --spot"),
    (("create", *CREATE, "--valid_until=6h"), r"--valid_until=6h only applies to queued"),
    (("run", *SLICE, "--workdir=workdirs/t2i"),
     r"'workdirs/t2i' is not a gs://BUCKET/PATH: a multi-host run needs a workdir that every"),
    (("run", *SLICE, "--workdir=gs://b/w", "--config=configs/base.py"),
     r"'configs/base.py' does not name a config file of this checkout: expected one of "
     r"configs/c2i.py.*configs/t2i.py"),
    (("run", *SLICE, "--workdir=gs://b/w", "--libtpu_preset=fast"),
     r"invalid choice: 'fast' \(choose from .*v5p_fsdp"),
    (("run", *SLICE, "--workdir=gs://b/w", "--config.train.num_steps", "10"),
     r"unrecognized argument '--config.train.num_steps': allowed are .*--config.KEY=VALUE"),
    (("install", *SLICE, "--config.train.num_steps=10"),
     r"unrecognized argument '--config.train.num_steps=10': allowed are this subcommand's "
     r"options$"),
    (("wait", *SLICE), r"wait is for queued resources: add --queued"),
])
def test_bad_inputs_name_the_value_and_what_is_allowed(tmp_path, args, message):
  result = launch(tmp_path, *args, "--dry_run")
  assert result.returncode == 2
  assert result.stdout == ""
  assert re.search(message, result.stderr.splitlines()[-1]), result.stderr


def _fake_gcloud(tmp_path, status: int, stdout: str = "") -> dict[str, str]:
  """A `gcloud` on PATH that logs its arguments, lists the archive it is asked to copy, prints
  `stdout` and exits with `status`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  script = bin_dir / "gcloud"
  script.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$FAKE_GCLOUD_LOG"\n'
                    'case "$5" in *.tar.gz) tar -tzf "$5" > "$FAKE_GCLOUD_LOG.tar";; esac\n'
                    f"echo {shlex.quote(stdout)}\nexit {status}\n")
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
          "FAKE_GCLOUD_LOG": str(tmp_path / "calls")}


def test_failing_step_stops_the_rest(tmp_path):
  result = launch(tmp_path, "up", *CREATE, *RUN[2:], env=_fake_gcloud(tmp_path, status=1))
  assert result.returncode == 1
  assert (tmp_path / "calls").read_text().splitlines() == [
      "compute tpus tpu-vm create sf-v5p --accelerator-type=v5p-64 --version=v2-alpha-tpuv5 "
      + ZONE]
  assert result.stderr == ("tpu_pod.py up: error: `gcloud compute tpus tpu-vm create` (the command "
                           "above) failed with exit status 1; the steps after it were not run.\n")


def test_install_ships_the_checkout_without_ignored_files(tmp_path):
  result = launch(tmp_path, "install", *SLICE, env=_fake_gcloud(tmp_path, status=0))
  assert result.returncode == 0, result.stderr
  calls = (tmp_path / "calls").read_text().splitlines()
  assert [call.split()[:4] for call in calls] == [["compute", "tpus", "tpu-vm", "scp"],
                                                  ["compute", "tpus", "tpu-vm", "ssh"]]
  files = (tmp_path / "calls.tar").read_text().splitlines()
  assert {"pyproject.toml", "requirements-lock.txt", "self_flow/main.py", "configs/t2i.py", "launch/tpu_pod.py"} <= set(
      files)
  assert not [f for f in files if f.startswith((".venv/", "workdirs/", "data/", ".git/"))]
  assert not (tmp_path / "self_flow-sf-v5p.tar.gz").exists()  # The local archive is removed.


@pytest.mark.parametrize("state,returncode,stderr", [
    ("ACTIVE", 0, ""),
    ("FAILED", 1, "tpu_pod.py wait: error: queued resource 'sf-v5p' is in state 'FAILED', not on "
                  "its way to ACTIVE"),
])
def test_wait_for_queued_resource(tmp_path, state, returncode, stderr):
  result = launch(tmp_path, "wait", *SLICE, "--queued",
                  env=_fake_gcloud(tmp_path, status=0, stdout=state))
  assert result.returncode == returncode
  assert result.stderr.startswith(stderr)
  assert (tmp_path / "calls").read_text().splitlines() == [
      f"compute tpus queued-resources describe sf-v5p --format=value(state.state) {ZONE}"]
