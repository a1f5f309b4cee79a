#!/usr/bin/env bash
# The system part of the set-up: the Debian packages of a fresh machine, installed only when
# missing (two dpkg queries when present): the embedded datasets (dataset-fashion-mnist;
# espeak-ng, which synthesises the spoken-word audio dataset), tcmalloc (15-20% faster CPU
# steps) and iproute2 (the Cloud Storage emulator's private network, tests/gcs_emulator.py),
# then LD_PRELOAD of tcmalloc and quiet TensorFlow logs for what the sourcing script
# runs. Sourced by setup.sh and test_newest.sh; run once by .ci/run before its two test runs,
# which must not both call apt-get.
set -euo pipefail
DEBIAN_PACKAGES=(dataset-fashion-mnist libtcmalloc-minimal4 espeak-ng iproute2)
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

TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [ -e "$TCMALLOC" ]; then export LD_PRELOAD="$TCMALLOC${LD_PRELOAD:+:$LD_PRELOAD}"; fi
# TensorFlow (used only by clu/tfds for I/O) is chatty; keep its C++ logs to errors.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
