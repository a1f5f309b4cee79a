#!/usr/bin/env bash
# The Debian packages of a fresh machine, installed only when missing (two dpkg queries when
# present): the embedded datasets (dataset-fashion-mnist; espeak-ng, which synthesises the
# spoken-word audio dataset) and tcmalloc (15-20% faster CPU steps). Sourced by setup.sh; run
# once by .ci/run before its two test runs, which must not both call apt-get.
set -euo pipefail
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
