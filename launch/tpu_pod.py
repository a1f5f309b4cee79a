r"""Creates a Cloud TPU slice, installs this checkout on every worker and runs self_flow there.

Each subcommand is a short sequence of `gcloud compute tpus ...` commands; `--dry_run` prints them
(shell-quoted, one per line, prefixed `[dry run]`) instead of running them. Without it they run in
order and the first failure stops the rest. Only the Python standard library is used, so this runs
on a laptop without jax.

  python launch/tpu_pod.py up --name=sf-v5p --zone=us-east5-a --accelerator_type=v5p-64 \
      --queued --spot --workdir=gs://BUCKET/t2i --libtpu_preset=v5p_fsdp \
      --config.data.data_dir=gs://BUCKET/shards
  python launch/tpu_pod.py create  --name=sf-v5p --zone=us-east5-a --accelerator_type=v5p-64
  python launch/tpu_pod.py wait    --name=sf-v5p --zone=us-east5-a --queued  # after create --queued
  python launch/tpu_pod.py install --name=sf-v5p --zone=us-east5-a
  python launch/tpu_pod.py run     --name=sf-v5p --zone=us-east5-a --workdir=gs://BUCKET/t2i \
      [--config=configs/t2i.py] [--libtpu_preset=v5p_fsdp] [--detach] [--config.KEY=VALUE ...]
  python launch/tpu_pod.py encode  --name=sf-v5p --zone=us-east5-a [--detach] --source=webdataset \
      --inputs='gs://BUCKET/raw/{00000..01999}.tar' --output_dir=gs://BUCKET/shards \
      --vae_path=gs://BUCKET/sd-vae-ft-ema --text_encoder_path=gs://BUCKET/t5-v1_1-xxl [...]
  python launch/tpu_pod.py stop    --name=sf-v5p --zone=us-east5-a
  python launch/tpu_pod.py delete  --name=sf-v5p --zone=us-east5-a [--queued]

`encode` runs the captioned-data encoder (`python -m self_flow.tools.encode_captioned --distributed
...`, its flags passed on as given) on every host: each host encodes its own input files on its
own chips, and a rerun after a preemption writes only the missing shards.

`run` starts the same command on every host: `python -m self_flow.main --config=... --workdir=gs://
... --distributed`, where `jax.distributed.initialize()` finds the other hosts by itself. Rerunning
`run` with the same workdir resumes from its latest checkpoint.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY_RUN_PREFIX = "[dry run] "
REMOTE_DIR = "~/self_flow"  # Left unquoted in remote commands so that the worker's shell expands ~.
REMOTE_ARCHIVE = "/tmp/self_flow.tar.gz"
REMOTE_LOG = f"{REMOTE_DIR}/train.log"
REMOTE_ENCODE_LOG = f"{REMOTE_DIR}/encode.log"
# self_flow needs Python 3.11 or newer (jax >= 0.10); the TPU runtimes ship Ubuntu 22.04, whose
# python3 is 3.10, so the workers get 3.11 (the locked set's Python) from the deadsnakes archive.
REMOTE_PYTHON = "python3.11"
QUEUED_POLL_SECONDS = 30

# TPU software ("runtime") version per generation, as recommended for JAX in "TPU software
# versions", https://cloud.google.com/tpu/docs/runtimes: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
# v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base. gcloud spells v5e slices v5litepod-N.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
ACCELERATOR_TYPE = re.compile(r"(?P<generation>[a-z0-9]+)-(?P<size>[1-9][0-9]*)")

# LIBTPU_INIT_ARGS presets. FSDP all-gathers parameters before every block; these let XLA run them
# asynchronously, fused with and overlapped by compute ("continuation fusion"), and overlap the
# data-parallel gradient all-reduce across steps. Flag sets as maxtext uses them: its
# benchmarks/xla_flags_library.py (CF_FOR_ALL_GATHER, DATA_PARALLEL_OVERLAP,
# DENSE_VMEM_LIMIT_FLAG) and its per-generation configs (configs/v4/*.sh, configs/v5p/*.sh).
_ASYNC_ALL_GATHER = ("--xla_enable_async_all_gather=true",)
_ALL_GATHER_FUSION = _ASYNC_ALL_GATHER + (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
)
_DATA_PARALLEL_OVERLAP = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
)
LIBTPU_PRESETS = {
    "default": (),  # libtpu's own defaults.
    "v4_fsdp": _ASYNC_ALL_GATHER,
    "v5p_fsdp": _ALL_GATHER_FUSION + _DATA_PARALLEL_OVERLAP,
    "v6e_fsdp": _ALL_GATHER_FUSION + _DATA_PARALLEL_OVERLAP + (
        "--xla_tpu_scoped_vmem_limit_kib=98304",),
}


class LaunchError(Exception):
  """A step could not be done; the message says which and why."""


class Runner:
  """Runs gcloud commands in order, or only prints them (`--dry_run`)."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def note(self, text: str) -> None:
    """Says what a step that is not a command line does (printed in both modes)."""
    print(f"{DRY_RUN_PREFIX if self.dry_run else ''}# {text}", flush=True)

  def run(self, argv: list[str]) -> None:
    """Runs one command with the terminal attached (gcloud may prompt); a failure stops all."""
    if self.dry_run:
      print(DRY_RUN_PREFIX + shlex.join(argv), flush=True)
      return
    print("+ " + shlex.join(argv), flush=True)
    returncode = _call(subprocess.call, argv)
    if returncode:
      raise LaunchError(f"`{shlex.join(argv[:5])}` (the command above) failed with exit status "
                        f"{returncode}; the steps after it were not run.")

  def output(self, argv: list[str]) -> str:
    """Runs a read-only query and returns its stdout (never called in a dry run)."""
    try:
      return _call(subprocess.check_output, argv, text=True)
    except subprocess.CalledProcessError as e:
      raise LaunchError(f"`{shlex.join(argv)}` failed with exit status {e.returncode}.") from e


def _call(function, argv, **kwargs):
  """Calls a subprocess function, turning a missing executable into a clear LaunchError."""
  try:
    return function(argv, **kwargs)
  except FileNotFoundError as e:
    raise LaunchError(f"{argv[0]!r} is not on PATH; install the Google Cloud CLI "
                      "(https://cloud.google.com/sdk/docs/install) or use --dry_run.") from e


# ---------------------------------------------------------------------------------------------
# Validation (argparse `type=` functions: the error names the bad value and what is allowed).


def tpu_name(value: str) -> str:
  """Cloud resource names: lower-case letters, digits and hyphens, starting with a letter."""
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", value):
    raise argparse.ArgumentTypeError(
        f"{value!r} is not a valid TPU name: use 1-63 lower-case letters, digits and hyphens, "
        "starting with a letter and not ending with a hyphen")
  return value


def zone(value: str) -> str:
  """A Compute Engine zone such as us-east5-a (a region is not enough for a TPU)."""
  if not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z]", value):
    raise argparse.ArgumentTypeError(
        f"{value!r} is not a zone: expected REGION-LETTER such as us-east5-a or europe-west4-b")
  return value


def accelerator_type(value: str) -> str:
  """GENERATION-SIZE with a generation that has a known runtime version."""
  match = ACCELERATOR_TYPE.fullmatch(value)
  if not match or match["generation"] not in RUNTIME_VERSIONS:
    allowed = ", ".join(f"{generation}-N" for generation in RUNTIME_VERSIONS)
    raise argparse.ArgumentTypeError(
        f"{value!r} is not a supported accelerator type: expected one of {allowed} "
        "(e.g. v5p-64; v5e is spelled v5litepod, e.g. v5litepod-16)")
  return value


def gcs_workdir(value: str) -> str:
  """Every host reads and writes the same checkpoints, so the workdir must be shared storage."""
  if not re.fullmatch(r"gs://[a-z0-9][-_.a-z0-9]*(/.*)?", value):
    raise argparse.ArgumentTypeError(
        f"{value!r} is not a gs://BUCKET/PATH: a multi-host run needs a workdir that every worker "
        "shares; a local path would give each worker its own checkpoints")
  return value.rstrip("/")


def _defines_get_config(path: str) -> bool:
  """Config files are the ones main.py can load: they define get_config."""
  with open(path) as f:
    return "\ndef get_config(" in f.read()


def config_file(value: str) -> str:
  """A config file of this checkout (it is copied to the workers), with an optional :ARG."""
  path = os.path.join(REPO_ROOT, value.split(":", 1)[0])
  if not (os.path.isfile(path) and _defines_get_config(path)):
    configs = os.path.join(REPO_ROOT, "configs")
    choices = sorted(f"configs/{name}" for name in os.listdir(configs)
                     if name.endswith(".py") and _defines_get_config(os.path.join(configs, name)))
    raise argparse.ArgumentTypeError(
        f"{value!r} does not name a config file of this checkout: expected one of "
        f"{', '.join(choices)} (paths relative to {REPO_ROOT}), optionally followed by :ARG")
  return value


# ---------------------------------------------------------------------------------------------
# gcloud command lines.


def _gcloud(args: argparse.Namespace, *words: str) -> list[str]:
  """`gcloud compute tpus WORDS` in the slice's zone (and project, when one is given)."""
  argv = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
  return argv + ([f"--project={args.project}"] if args.project else [])


def _runtime_version(args: argparse.Namespace) -> str:
  """The explicit --runtime_version, else the recommended one for the TPU generation."""
  generation = ACCELERATOR_TYPE.fullmatch(args.accelerator_type)["generation"]
  return args.runtime_version or RUNTIME_VERSIONS[generation]


def _qr_id(args: argparse.Namespace) -> str:
  """Queued-resource id: --qr_id, else the node's name."""
  return args.qr_id or args.name


def create_command(args: argparse.Namespace) -> list[str]:
  """tpu-vm create (immediate, fails when no capacity) or a queued resource (waits for it)."""
  if args.queued:
    words = ["queued-resources", "create", _qr_id(args), f"--node-id={args.name}",
             f"--accelerator-type={args.accelerator_type}",
             f"--runtime-version={_runtime_version(args)}"]
    if args.valid_until:
      words.append(f"--valid-until-duration={args.valid_until}")
  else:
    words = ["tpu-vm", "create", args.name, f"--accelerator-type={args.accelerator_type}",
             f"--version={_runtime_version(args)}"]
    if args.preemptible:
      words.append("--preemptible")
  if args.spot:
    words.append("--spot")
  return _gcloud(args, *words)


def queued_state_command(args: argparse.Namespace) -> list[str]:
  """Prints only the queued resource's state (WAITING_FOR_RESOURCES, ..., ACTIVE)."""
  return _gcloud(args, "queued-resources", "describe", _qr_id(args), "--format=value(state.state)")


def ssh_command(args: argparse.Namespace, remote: str) -> list[str]:
  """Runs a shell command on every worker of the slice at once."""
  return _gcloud(args, "tpu-vm", "ssh", args.name, "--worker=all", f"--command={remote}")


def local_archive(args: argparse.Namespace) -> str:
  """Where install packs the checkout before copying it (one file per slice name)."""
  return os.path.join(tempfile.gettempdir(), f"self_flow-{args.name}.tar.gz")


def scp_command(args: argparse.Namespace) -> list[str]:
  """Copies the packed checkout to every worker."""
  return _gcloud(args, "tpu-vm", "scp", local_archive(args), f"{args.name}:{REMOTE_ARCHIVE}",
                 "--worker=all")


def remote_install() -> str:
  """Unpacks the checkout over REMOTE_DIR (keeping its .venv) and installs self_flow with its tpu
  extra at the locked versions (jax[tpu] pins the libtpu of its jax)."""
  python = REMOTE_PYTHON
  pip = ".venv/bin/pip install -q --disable-pip-version-check"
  return " && ".join([
      f"if ! command -v {python} >/dev/null; then sudo add-apt-repository -y ppa:deadsnakes/ppa"
      f" && sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
      f" {python} {python}-venv; fi",
      f"mkdir -p {REMOTE_DIR}",
      f"tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR}",
      f"rm -f {REMOTE_ARCHIVE}",
      f"cd {REMOTE_DIR}",
      f"{{ [ -x .venv/bin/python ] || {python} -m venv .venv; }}",
      f"{pip} -U pip",
      f"{pip} -c requirements-lock.txt -e {shlex.quote('.[tpu]')}",
  ])


def remote_run(args: argparse.Namespace) -> str:
  """The training command every worker runs, with the preset's LIBTPU_INIT_ARGS exported."""
  main = [".venv/bin/python", "-m", "self_flow.main", f"--config={args.config}",
          f"--workdir={args.workdir}", "--distributed", *args.overrides]
  flags = LIBTPU_PRESETS[args.libtpu_preset]
  exports = [f"export LIBTPU_INIT_ARGS={shlex.quote(' '.join(flags))}"] if flags else []
  return _remote_command(main, exports, args.detach, REMOTE_LOG)


def remote_encode(args: argparse.Namespace) -> str:
  """The encoding command every worker runs (the encoder's own flags passed on)."""
  main = [".venv/bin/python", "-m", "self_flow.tools.encode_captioned", "--distributed",
          *args.overrides]
  return _remote_command(main, [], args.detach, REMOTE_ENCODE_LOG)


def _remote_command(main: list[str], exports: list[str], detach: bool, log: str) -> str:
  steps = [f"cd {REMOTE_DIR}", *exports]
  if detach:  # Survives the ssh session: a run of days must not hang on a laptop's link.
    steps.append(f"{{ setsid nohup {shlex.join(main)} > {log} 2>&1 < /dev/null & }}")
  else:
    steps.append(shlex.join(main))
  return " && ".join(steps)


# SIGTERM makes the trainer save a checkpoint at the next step boundary and exit (the preemption
# path); waiting for the exit makes a following `delete` safe. The [s] keeps the pattern from
# matching the shell that runs this very command.
_TRAINER = "'[s]elf_flow[.]main'"
REMOTE_STOP = (f"pkill -TERM -f {_TRAINER}; "
               f"while pgrep -f {_TRAINER} >/dev/null; do sleep 5; done")


# ---------------------------------------------------------------------------------------------
# Subcommands.


def create(runner: Runner, args: argparse.Namespace) -> None:
  """Creates the slice (or queues the request for it)."""
  runner.run(create_command(args))


def wait(runner: Runner, args: argparse.Namespace) -> None:
  """Waits until a queued resource is ACTIVE: until then its workers cannot be reached."""
  argv = queued_state_command(args)
  if runner.dry_run:
    runner.run(argv)
    runner.note(f"repeated every {QUEUED_POLL_SECONDS} s until the state is ACTIVE")
    return
  while (state := runner.output(argv).strip()) != "ACTIVE":
    if state in ("FAILED", "SUSPENDED", "SUSPENDING", "DELETING", ""):
      raise LaunchError(f"queued resource {_qr_id(args)!r} is in state {state or 'unknown'!r}, "
                        "not on its way to ACTIVE; see `gcloud compute tpus queued-resources "
                        f"describe {_qr_id(args)} --zone={args.zone}`")
    print(f"queued resource {_qr_id(args)}: {state}; asking again in {QUEUED_POLL_SECONDS} s",
          flush=True)
    time.sleep(QUEUED_POLL_SECONDS)


def pack_checkout(archive: str) -> None:
  """Packs the files git would see (tracked, and untracked but not ignored) as they are on disk,
  so the workers run the local edits but never .venv, workdirs/ or data/ (all in .gitignore)."""
  listing = ["git", "-C", REPO_ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
  try:
    paths = subprocess.check_output(listing, text=True).split("\0")
  except (OSError, subprocess.CalledProcessError) as e:
    raise LaunchError(f"install copies the files git lists in {REPO_ROOT}, and "
                      f"`{shlex.join(listing)}` failed: {e}") from e
  with tarfile.open(archive, "w:gz") as tar:
    for path in paths:
      if path and os.path.isfile(os.path.join(REPO_ROOT, path)):  # Skips deleted tracked files.
        tar.add(os.path.join(REPO_ROOT, path), arcname=path)


def install(runner: Runner, args: argparse.Namespace) -> None:
  """Copies this checkout to every worker and installs self_flow[tpu] there."""
  archive = local_archive(args)
  runner.note(f"pack this checkout's files (git ls-files: tracked, and untracked but not "
              f"ignored) into {archive}")
  if not runner.dry_run:
    pack_checkout(archive)
  try:
    runner.run(scp_command(args))
  finally:
    if not runner.dry_run:
      os.remove(archive)
  runner.run(ssh_command(args, remote_install()))


def run(runner: Runner, args: argparse.Namespace) -> None:
  """Starts training on every worker."""
  runner.run(ssh_command(args, remote_run(args)))
  if args.detach:
    runner.note(f"follow the log: gcloud compute tpus tpu-vm ssh {args.name} --zone={args.zone} "
                f"--worker=0 --command='tail -f {REMOTE_LOG}'")


def encode(runner: Runner, args: argparse.Namespace) -> None:
  """Encodes captioned data into latent shards on every worker."""
  runner.run(ssh_command(args, remote_encode(args)))
  if args.detach:
    runner.note(f"follow the log: gcloud compute tpus tpu-vm ssh {args.name} --zone={args.zone} "
                f"--worker=0 --command='tail -f {REMOTE_ENCODE_LOG}'")


def stop(runner: Runner, args: argparse.Namespace) -> None:
  """Stops a run on every worker and waits until it has saved its checkpoint and exited."""
  runner.run(ssh_command(args, REMOTE_STOP))


def delete(runner: Runner, args: argparse.Namespace) -> None:
  """Deletes the slice; a queued resource is deleted with its node (--force)."""
  if args.queued:
    runner.run(_gcloud(args, "queued-resources", "delete", _qr_id(args)) + ["--force"])
  else:
    runner.run(_gcloud(args, "tpu-vm", "delete", args.name))


def up(runner: Runner, args: argparse.Namespace) -> None:
  """create, (wait,) install and run in one go."""
  create(runner, args)
  if args.queued:
    wait(runner, args)
  install(runner, args)
  run(runner, args)


# ---------------------------------------------------------------------------------------------
# Command line.


def _add_common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--name", required=True, type=tpu_name, help="TPU VM (node) name.")
  parser.add_argument("--zone", required=True, type=zone, help="e.g. us-east5-a.")
  parser.add_argument("--project", help="Google Cloud project (default: gcloud's).")
  parser.add_argument("--dry_run", action="store_true",
                      help="Print the gcloud commands instead of running them.")


def _add_queued(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--queued", action="store_true",
                      help="Use a queued resource (waits for capacity instead of failing).")
  parser.add_argument("--qr_id", type=tpu_name, help="Queued-resource id (default: --name).")


def _add_create(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--accelerator_type", required=True, type=accelerator_type,
                      help="e.g. v5p-64 (v4/v5p count TensorCores, v5litepod/v6e chips).")
  parser.add_argument("--runtime_version",
                      help="TPU software version (default: the recommended one per generation: "
                      + ", ".join(f"{k} {v}" for k, v in RUNTIME_VERSIONS.items()) + ").")
  capacity = parser.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="Spot capacity (can be preempted).")
  capacity.add_argument("--preemptible", action="store_true",
                        help="Preemptible capacity (tpu-vm create only; queued resources: --spot).")
  parser.add_argument("--valid_until", metavar="DURATION",
                      help="With --queued: drop the request if not served within e.g. 6h.")


def _add_run(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", required=True, type=gcs_workdir,
                      help="gs://BUCKET/PATH for checkpoints and logs; the same one resumes.")
  parser.add_argument("--config", default="configs/t2i.py", type=config_file,
                      help="Config file of this checkout, with optional :ARG.")
  parser.add_argument("--libtpu_preset", default="default", choices=sorted(LIBTPU_PRESETS),
                      help="LIBTPU_INIT_ARGS preset exported on the workers.")
  parser.add_argument("--detach", action="store_true",
                      help=f"Run in the background on the workers, logging to {REMOTE_LOG}.")


def _add_detach(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--detach", action="store_true",
                      help=f"Run in the background on the workers, logging to {REMOTE_ENCODE_LOG}.")


# What each subcommand passes on to the program it starts: nothing, --config.KEY=VALUE
# overrides (self_flow.main), or every --flag[=value] (the encoder's own flags).
_PASSED_ON = {
    None: None,
    "overrides": re.compile(r"--config\.[A-Za-z_][\w.]*=.*", re.S),
    "flags": re.compile(r"--[A-Za-z_]\w*(=.*)?", re.S),
}
_ALLOWED_TEXT = {
    None: "this subcommand's options",
    "overrides": "this subcommand's options and --config.KEY=VALUE overrides (with '=')",
    "flags": "this subcommand's options and encode_captioned's flags (--name=value)",
}

SUBCOMMANDS = {
    # name: (function, argument groups, what is passed on to the program: see _PASSED_ON)
    "create": (create, (_add_queued, _add_create), None),
    "wait": (wait, (_add_queued,), None),
    "install": (install, (), None),
    "encode": (encode, (_add_detach,), "flags"),
    "run": (run, (_add_run,), "overrides"),
    "stop": (stop, (), None),
    "delete": (delete, (_add_queued,), None),
    "up": (up, (_add_queued, _add_create, _add_run), "overrides"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
  """The top-level parser and one subparser per subcommand (for errors in its own usage)."""
  parser = argparse.ArgumentParser(
      prog="tpu_pod.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  subparsers = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
  by_name = {}
  for name, (function, groups, _) in SUBCOMMANDS.items():
    by_name[name] = subparsers.add_parser(name, help=function.__doc__.splitlines()[0])
    _add_common(by_name[name])
    for add_group in groups:
      add_group(by_name[name])
  return parser, by_name


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Parses and cross-checks the options; errors exit with status 2 and name the bad value."""
  parser, subparsers = build_parser()
  args, extra = parser.parse_known_args(argv)
  error = subparsers[args.subcommand].error
  function, _, passed_on = SUBCOMMANDS[args.subcommand]
  for argument in extra:  # Unknown arguments go to the program the subcommand starts.
    if passed_on is None or not _PASSED_ON[passed_on].fullmatch(argument):
      error(f"unrecognized argument {argument!r}: allowed are {_ALLOWED_TEXT[passed_on]}")
  args.overrides = extra
  if getattr(args, "valid_until", None) and not args.queued:
    error(f"--valid_until={args.valid_until} only applies to queued resources: add --queued or "
          "drop it")
  if getattr(args, "preemptible", False) and args.queued:
    error("--preemptible is not available for queued resources: use --spot")
  if function is wait and not args.queued:
    error("wait is for queued resources: add --queued (tpu-vm create returns when the slice is "
          "ready)")
  args.function = function
  return args


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  try:
    args.function(Runner(args.dry_run), args)
  except LaunchError as e:
    print(f"tpu_pod.py {args.subcommand}: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
