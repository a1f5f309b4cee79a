#!/usr/bin/env bash
# The fast subset of the tests on the newest releases: Python 3.12 (PYTHON_NEWEST) with the
# newest jax, flax, optax, orbax, grain ... that the ranges of requirements.txt admit, no lock;
# plus the Colab-like install test, which needs a jax newer than the lock. .ci/run runs it beside
# the locked full suite, so API drift shows up as a failing test here. Extra arguments go to
# pytest.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
source launch/setup_system.sh

# A Python 3.12: PYTHON_NEWEST, else python3.12 on PATH, else a pyenv or system installation.
PYTHON_NEWEST_FOUND=""
for candidate in "${PYTHON_NEWEST:-}" python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
    /usr/bin/python3.12 /usr/local/bin/python3.12; do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    PYTHON_NEWEST_FOUND="$candidate"
    break
  fi
done
if [ -z "$PYTHON_NEWEST_FOUND" ]; then
  echo "test_newest: no Python 3.12 found (PATH, pyenv, /usr/bin); install one or set PYTHON_NEWEST." >&2
  exit 1
fi
VENV="$REPO_ROOT/.venv-newest"
if [ ! -x "$VENV/bin/python" ]; then
  echo "test_newest: creating $VENV with $PYTHON_NEWEST_FOUND" >&2
  "$PYTHON_NEWEST_FOUND" -m venv "$VENV"
fi
# Every run upgrades to today's releases (eager: dependencies of dependencies too).
"$VENV/bin/pip" install -q --disable-pip-version-check -U pip
"$VENV/bin/pip" install -q --disable-pip-version-check -U --upgrade-strategy eager -e ".[dev]"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m, platform
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "clu", "numpy")
print(f"test_newest: Python {platform.python_version()}, "
      + ", ".join(f"{n} {m.version(n)}" for n in names))
PY

# Model, objective, train step, end-to-end runs with checkpoint resume (also across worker
# counts), every Cloud Storage client against the emulator, the readers of captioned data
# (pyarrow, tarfile, tfds), and the Colab install.
exec "$VENV/bin/python" -m pytest -q tests/test_model.py tests/test_objectives.py \
  tests/test_train_step.py tests/test_train.py tests/test_resume.py tests/test_gcs_emulator.py \
  tests/test_captioned_sources.py tests/test_colab_install.py "$@"
