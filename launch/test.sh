#!/usr/bin/env bash
# Sets up (idempotent; also the TPU-compiler environment of the AOT tests) and runs the test
# suite; extra arguments go to pytest.
set -euo pipefail
# The parity tests compare against PyTorch references (transformers' T5): the reference extra.
export SELF_FLOW_MORE_EXTRAS="${SELF_FLOW_MORE_EXTRAS:-reference}"
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
source "$(dirname "${BASH_SOURCE[0]}")/setup_tpu_aot.sh"  # libtpu in .venv-tpu, for test_aot.py
exec python -m pytest -q "$@"
