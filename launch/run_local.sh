#!/usr/bin/env bash
# Sets up (idempotent) and trains the CPU-sized text-to-image Self-Flow run on embedded
# Fashion-MNIST with generated captions. CONFIG=configs/c2i.py:local picks the class-conditional run.
# Extra arguments go to self_flow.main, e.g. --config.train.num_steps=100.
# Rerunning with the same WORKDIR resumes from its latest checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
CONFIG="${CONFIG:-configs/t2i.py:local}"
WORKDIR="${WORKDIR:-workdirs/t2i_local}"
exec python -m self_flow.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
