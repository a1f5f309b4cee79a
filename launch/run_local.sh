#!/usr/bin/env bash
# Sets up (idempotent) and trains the CPU-sized Self-Flow run on embedded Fashion-MNIST.
# Extra arguments go to self_flow.main, e.g. --config.train.num_steps=100.
# Rerunning with the same WORKDIR resumes from its latest checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
CONFIG="${CONFIG:-configs/c2i.py:local}"
WORKDIR="${WORKDIR:-workdirs/c2i_local}"
exec python -m self_flow.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
