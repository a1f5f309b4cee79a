#!/usr/bin/env bash
# Idempotent set-up for a fresh machine, sourced by run_local.sh and test.sh:
#   - Debian packages: the embedded datasets (dataset-fashion-mnist; espeak-ng, which synthesises
#     the spoken-word audio dataset) and tcmalloc (15-20% faster CPU steps), installed only when
#     missing;
#   - a virtual environment in .venv with requirements.txt, reinstalled only when that file changes;
#   - LD_PRELOAD of tcmalloc when present.
# Fast when already set up (two dpkg queries and one checksum).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

DEBIAN_PACKAGES=(dataset-fashion-mnist libtcmalloc-minimal4 espeak-ng)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing requirements.txt into $VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check -U pip
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$STAMP"
fi

TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [ -e "$TCMALLOC" ]; then export LD_PRELOAD="$TCMALLOC${LD_PRELOAD:+:$LD_PRELOAD}"; fi
export PATH="$VENV/bin:$PATH"
# TensorFlow (used only by clu/tfds for I/O) is chatty; keep its C++ logs to errors.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
