#!/usr/bin/env bash
# Times the Self-Flow step under several XLA:CPU flag sets, each beside the PyTorch step at equal
# math in the same process (python -m self_flow.bench), so that every flag set is judged by a
# ratio taken in one run, not by absolute times across runs: the attempts behind the flag table
# of benchmarks/RESULTS.md (issue 18).
#   bash benchmarks/xla_cpu_flags.sh OUT_DIR [REPEATS [LABEL...]]
# With labels, only those sets run (e.g. `baseline ynn_dot`); without, all of them.
# One pinned thread on core 1, tcmalloc, the CPU reference protocol of self_flow/bench.py. Needs
# torch (pip install -e ".[bench]"). Each set takes about a minute on 2 cores.
set -uo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: xla_cpu_flags.sh OUT_DIR [REPEATS]}"
REPEATS="${2:-5}"
mkdir -p "$OUT"
SINGLE="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# label -> extra XLA flags (names from this jaxlib's flag table).
declare -A SETS=(
  [baseline]=""
  [xnnpack]="--xla_cpu_use_xnnpack=true"
  [onednn]="--xla_cpu_use_onednn=true"
  [fast_math]="--xla_cpu_enable_fast_math=true"
  [vector512]="--xla_cpu_prefer_vector_width=512"
  [no_fusion_emitters]="--xla_cpu_use_fusion_emitters=false"
  # YNNPACK library fusions beyond the default single dots: a dot with its elementwise neighbours,
  # elementwise chains, reductions (DebugOptions.LibraryFusionType).
  [ynn_dot]="--xla_cpu_experimental_ynn_fusion_type=+dot"
  [ynn_eltwise]="--xla_cpu_experimental_ynn_fusion_type=+eltwise"
  [ynn_reduce]="--xla_cpu_experimental_ynn_fusion_type=+reduce"
  [ynn_all]="--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise,+reduce"
)
LABELS=("${@:3}")
if [ "${#LABELS[@]}" -eq 0 ]; then
  LABELS=(baseline xnnpack onednn fast_math vector512 no_fusion_emitters ynn_dot ynn_eltwise
          ynn_reduce ynn_all)
fi
cd "$REPO_ROOT"
for label in "${LABELS[@]}"; do
  echo "== $label: ${SETS[$label]}"
  taskset -c 1 env XLA_FLAGS="$SINGLE ${SETS[$label]}" \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    python -m self_flow.bench --config=configs/c2i.py:cpu_reference \
    --variants=self_flow,torch_equal --warmup=1 --repeats="$REPEATS" \
    > "$OUT/$label.md" 2> "$OUT/$label.log" || echo "   failed (see $OUT/$label.log)"
  grep -E "^\| (self_flow|torch_equal) |torch_equal / self_flow" "$OUT/$label.md"
done
