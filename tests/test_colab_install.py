"""The notebooks' set-up cell in a Colab-like environment: a fresh virtual environment that
already has a jax newer than the lock, the Jupyter kernel and TensorFlow, as Colab's runtimes do.
The cell (run as Colab would, outside any checkout) must add the rest of self_flow's packages
and leave those exactly as they were: a downgraded jax under Colab's accelerator plugin, or a
replaced kernel under the running notebook, is what breaks a Colab session.

Needs Python >= 3.12, where jax releases newer than the lock's exist (launch/test_newest.sh runs
it); the locked Python 3.11 has none, so it is skipped there.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What Colab has before the notebook runs, and must still have, at the same versions, after it.
PREINSTALLED = ("jax", "jaxlib", "ipykernel", "tensorflow-cpu")
KEPT = PREINSTALLED + ("ipython", "tornado", "pyzmq", "jupyter-client", "numpy", "tensorboard")

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="no jax newer than the lock exists for Python "
    f"{sys.version_info.major}.{sys.version_info.minor}; launch/test_newest.sh runs this on 3.12")


def _versions(python: str, cwd) -> dict[str, str]:
  """{name: version} installed for `python`, asked from `cwd` (a checkout's cwd would add its
  egg-info)."""
  script = ("import importlib.metadata as m, json; print(json.dumps({d.metadata['Name'].lower()"
            ".replace('_', '-'): d.version for d in m.distributions()}))")
  return json.loads(subprocess.run([python, "-c", script], capture_output=True, text=True,
                                   cwd=cwd, check=True).stdout)


def _release(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in re.findall(r"\d+", version)[:4])


def _locked(name: str) -> str:
  with open(os.path.join(REPO, "requirements-lock.txt")) as f:
    return next(line.split("==")[1].strip() for line in f if line.startswith(f"{name}=="))


def test_setup_cell_adds_packages_without_replacing_jax_kernel_or_tensorflow(tmp_path):
  venv = tmp_path / "colab"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
  subprocess.run([*pip, "-U", "pip"], check=True)
  subprocess.run([*pip, *PREINSTALLED], check=True)
  before = _versions(python, tmp_path)
  assert _release(before["jax"]) > _release(_locked("jax")), before["jax"]
  assert "flax" not in before and "self-flow" not in before

  # Colab starts outside any checkout; a copy of this working tree stands for the clone.
  top_level = {".git", ".venv", ".venv-tpu", ".venv-newest", "workdirs", "data"}
  shutil.copytree(REPO, tmp_path / "self_flow_repo", ignore=lambda folder, names: [
      n for n in names if (folder == REPO and n in top_level) or n == "__pycache__"
      or n.endswith(".egg-info")])
  notebook = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
  [setup] = [c.source for c in notebook.cells if "setup" in c.metadata.get("tags", [])]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([python, "-c", f"repo_url = ''\n{setup}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert f"Runtime: JAX {before['jax']} on CPU" in result.stdout, result.stdout[-2000:]
  assert "install_missing: added" in result.stdout

  after = _versions(python, tmp_path)
  assert {n: after.get(n) for n in KEPT if n in before} == {n: before[n] for n in KEPT
                                                            if n in before}
  assert not {"tensorflow", "jax-cuda12-plugin", "libtpu"} & set(after)
  imports = "import clu, configs.c2i, flax, grain, optax, orbax.checkpoint, self_flow.train"
  subprocess.run([python, "-c", imports], cwd=tmp_path, env=env, check=True)
