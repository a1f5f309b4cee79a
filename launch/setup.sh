#!/usr/bin/env bash
# Idempotent set-up for a fresh machine, sourced by run_local.sh and test.sh:
#   - the Debian packages of the embedded datasets and tcmalloc, preloaded (setup_system.sh);
#   - a virtual environment in .venv holding self_flow (editable) with its dev extra (and those in
#     SELF_FLOW_MORE_EXTRAS), at the exact
#     versions of requirements-lock.txt, plus the tpu or cuda12 extra on a host with a TPU or an
#     NVIDIA GPU (self_flow/accelerators.py decides; SELF_FLOW_EXTRA=tpu|cuda12|none overrides);
#     reinstalled only when pyproject.toml, requirements*.txt or the extra change;
#   - .venv/bin first on PATH.
# Fast when already set up (two dpkg queries and one checksum).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

source "$REPO_ROOT/launch/setup_system.sh"

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); self_flow needs 3.11 or newer (jax >= 0.10). Install one (e.g. python3.11 from your distribution, pyenv or uv) and rerun with PYTHON=python3.11." >&2
  exit 1
fi
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.install.sha256"
EXTRA="${SELF_FLOW_EXTRA:-$("$PYTHON" self_flow/accelerators.py)}"
# SELF_FLOW_MORE_EXTRAS: extras beyond dev, e.g. reference (the PyTorch parity references that
# launch/test.sh asks for).
EXTRAS="dev${SELF_FLOW_MORE_EXTRAS:+,$SELF_FLOW_MORE_EXTRAS}${EXTRA:+,$EXTRA}"
EXTRAS="${EXTRAS%,none}"
want="$(cat pyproject.toml requirements.txt requirements-lock.txt <(echo "$EXTRAS") | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing self_flow[$EXTRAS] (versions of requirements-lock.txt) into $VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check -U pip
  "$VENV/bin/pip" install -q --disable-pip-version-check -c requirements-lock.txt -e ".[$EXTRAS]"
  echo "$want" > "$STAMP"
fi

export PATH="$VENV/bin:$PATH"
