#!/usr/bin/env bash
# Sourced by test.sh after setup.sh: the environment of the ahead-of-time TPU compile tests
# (tests/test_aot.py). .venv-tpu is .venv (through a .pth file, so nothing is installed twice)
# plus the tpu extra, i.e. libtpu at the locked version; the CPU environment stays free of it.
# Reinstalled only when pyproject.toml or the lock change; exports SELF_FLOW_TPU_PYTHON.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_VENV="$REPO_ROOT/.venv-tpu"
TPU_STAMP="$TPU_VENV/.requirements-tpu.sha256"
tpu_want="$(cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/requirements-lock.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$TPU_VENV/bin/python" ]; then
  echo "setup: creating $TPU_VENV (TPU compiler for the AOT tests)" >&2
  "$REPO_ROOT/.venv/bin/python" -m venv --without-pip "$TPU_VENV"
fi
if [ "$(cat "$TPU_STAMP" 2>/dev/null)" != "$tpu_want" ]; then
  base_site="$("$REPO_ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  tpu_site="$("$TPU_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$base_site" > "$tpu_site/self_flow_base_env.pth"
  tpu_extra="$(sed -n 's/^tpu = \["\(.*\)"\]$/\1/p' "$REPO_ROOT/pyproject.toml")"
  echo "setup: installing $tpu_extra (versions of requirements-lock.txt) into $TPU_VENV" >&2
  "$REPO_ROOT/.venv/bin/pip" --python "$TPU_VENV/bin/python" install -q \
    --disable-pip-version-check -c "$REPO_ROOT/requirements-lock.txt" "$tpu_extra"
  echo "$tpu_want" > "$TPU_STAMP"
fi
export SELF_FLOW_TPU_PYTHON="$TPU_VENV/bin/python"
