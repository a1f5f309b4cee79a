#!/usr/bin/env bash
# Regenerates requirements-lock.txt: the newest releases that requirements.txt and the extras
# dev, notebooks, tpu and reference admit on Python 3.11 (PYTHON), resolved in a fresh virtual
# environment and frozen.
# CI and launch/setup.sh install with it as constraints, so every run gets the same versions;
# commit the new lock only after `bash launch/test.sh` passes with it.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check -U pip
# torch's CPU build first (the reference extra's; its CUDA build brings triton, which crashes
# after TensorFlow), from TORCH_INDEX_URL.
"$work/venv/bin/pip" install -q --disable-pip-version-check torch \
  --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
"$work/venv/bin/pip" install -q --disable-pip-version-check "$REPO_ROOT[dev,notebooks,tpu,reference]"
{
  echo "# Exact versions of every package CI installs (pip install -c requirements-lock.txt ...):"
  echo "# $("$work/venv/bin/python" --version), $(date -u +%Y-%m-%d). Regenerate: bash launch/update_lock.sh"
  "$work/venv/bin/pip" freeze --disable-pip-version-check --all | grep -v -i -E "^(self-flow|pip|setuptools|wheel)[ =@]"
} > "$REPO_ROOT/requirements-lock.txt"
echo "wrote $REPO_ROOT/requirements-lock.txt" >&2
