"""Installs self_flow into a Python environment that already has its own jax (Colab, Kaggle, a
cloud image), adding only what is missing and replacing nothing the environment depends on.

A plain `pip install -e .` resolves requirements.txt against whatever is installed and may
replace packages that the running kernel has already imported, or that the accelerator plugin
was built for. Here the packages of PROTECTED that are installed (jax and its plugins, the
Jupyter kernel, TensorFlow, numpy) are pinned at their installed versions in a constraints file,
so pip can only add packages or stop with an error naming the conflict; any TensorFlow build
already installed stands for the tensorflow-cpu of requirements.txt; self_flow itself is
installed editable without dependencies. Run by the notebooks' set-up cell:

  python launch/install_missing.py [--extra=notebooks]

Standard library only: it runs before anything of self_flow's is installed.
"""

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Installed versions of these are never changed: jax/jaxlib with the plugins built for them, the
# kernel the notebook runs in, TensorFlow (Colab's, with CUDA) and the numpy all of them use.
PROTECTED = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
             "jax-cuda13-pjrt", "libtpu", "libtpu-nightly", "numpy", "ipykernel", "ipython",
             "jupyter-client", "jupyter-core", "jupyter-server", "tornado", "pyzmq", "traitlets",
             "tensorflow", "tensorflow-cpu", "tf-nightly", "tf-keras", "keras", "tensorboard")
# Any of these satisfies the TensorFlow requirement (clu and tfds only need `import tensorflow`).
TENSORFLOW_BUILDS = ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tf-nightly")


def normalize(name: str) -> str:
  """PEP 503 name: lower case, runs of -_. as one '-'."""
  return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
  """{normalized distribution name: version} of this interpreter's environment."""
  return {normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
          if d.metadata["Name"]}


def requirement_name(line: str) -> str:
  return normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0))


def read_requirements(path: str) -> list[str]:
  """The requirement lines of a requirements file, without comments."""
  with open(path) as f:
    lines = [line.split("#", 1)[0].strip() for line in f]
  return [line for line in lines if line]


def extra_requirements(pyproject_path: str, extra: str) -> list[str]:
  """The requirements of one `name = ["req", ...]` extra of pyproject.toml (one line each)."""
  with open(pyproject_path) as f:
    for line in f:
      match = re.fullmatch(rf"{re.escape(extra)} = \[(.*)\]", line.strip())
      if match:
        return re.findall(r'"([^"]+)"', match.group(1))
  raise ValueError(f"pyproject.toml has no extra {extra!r}.")


def plan(requirements: list[str], installed: dict[str, str]) -> tuple[list[str], list[str]]:
  """(requirements to hand to pip, constraints pinning the installed protected packages)."""
  has_tensorflow = any(build in installed for build in TENSORFLOW_BUILDS)
  wanted = [r for r in requirements
            if not (has_tensorflow and requirement_name(r) in TENSORFLOW_BUILDS)]
  pins = [f"{name}=={installed[name]}" for name in PROTECTED if name in installed]
  return wanted, pins


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--extra", action="append", default=[],
                      help="Also the requirements of this extra of pyproject.toml.")
  args = parser.parse_args(argv)
  requirements = read_requirements(os.path.join(REPO_ROOT, "requirements.txt"))
  for extra in args.extra:
    requirements += extra_requirements(os.path.join(REPO_ROOT, "pyproject.toml"), extra)
  before = installed_versions()
  wanted, pins = plan(requirements, before)
  pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
    constraints.write("\n".join(pins) + "\n")
  try:
    result = subprocess.run([*pip, "-c", constraints.name, *wanted], check=False)
    if result.returncode:
      sys.exit(f"install_missing: pip could not add self_flow's requirements without changing "
               f"the installed {', '.join(pins)} (exit status {result.returncode}; pip's "
               "message above names the conflict). Use a runtime with a newer jax, or a fresh "
               "virtual environment with `pip install -e \".[dev]\"`.")
    subprocess.run([*pip, "--no-deps", "-e", REPO_ROOT], check=True)
  finally:
    os.remove(constraints.name)
  after = installed_versions()
  added = sorted(f"{n} {v}" for n, v in after.items() if n not in before)
  changed = sorted(f"{n} {before[n]} -> {v}" for n, v in after.items()
                   if n in before and before[n] != v)
  kept = [f"{n} {before[n]}" for n in PROTECTED if n in before]
  print(f"install_missing: added {len(added)} packages; kept {', '.join(kept) or 'none'}.")
  if changed:
    print(f"install_missing: upgraded (not protected): {', '.join(changed)}.")


if __name__ == "__main__":
  main()
