#!/usr/bin/env bash
# Compiles the paper-scale presets for TPU topologies ahead of time (python -m self_flow.aot) and
# collects one markdown row per compiled step, then one step-time band row per compiled step:
# the runs behind benchmarks/TPU_AOT.md.
#   bash benchmarks/tpu_aot_table.sh OUT_DIR [CONFIG TOPOLOGY]...
# Without CONFIG TOPOLOGY pairs it runs the table's list below; a CONFIG may carry config
# overrides after the file, separated by spaces (quote it). Needs the TPU environment
# (launch/setup_tpu_aot.sh, or any Python with the tpu extra as TPU_PYTHON). Each compile
# takes minutes on 2 cores; a step that does not fit is recorded and the script goes on. A row
# whose JSON is already in OUT_DIR is not compiled again: rerun the same command to finish an
# interrupted table. With REPRICE=1 such a row is priced again from its saved JSON and HLO
# (`self_flow.aot --reprice`, seconds: after a change to hlo_collectives or the chip table).
set -uo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: tpu_aot_table.sh OUT_DIR [CONFIG TOPOLOGY]...}"
shift
TPU_PYTHON="${TPU_PYTHON:-${SELF_FLOW_TPU_PYTHON:-$REPO_ROOT/.venv-tpu/bin/python}}"
if (($# == 0)); then
  set -- \
    configs/t2i.py v5e:4x4  configs/t2a.py v5e:4x4  configs/t2v.py v5p:2x2x4 \
    configs/multimodal.py v5p:2x2x4  configs/c2i_imagenet256.py v5p:2x2x4 \
    configs/multimodal.py:4b v5p:4x4x4 \
    configs/t2i.py v5e:8x8  configs/t2i.py v5p:2x2x4  configs/t2i.py v5p:4x4x4 \
    configs/t2i.py v6e:4x4  configs/t2i.py v6e:8x8  configs/c2i_imagenet256.py v5e:4x4 \
    configs/c2i_imagenet256.py v6e:4x4  configs/t2a.py v6e:4x4  configs/t2v.py v5p:4x4x4 \
    "configs/t2i.py --config.text.encoder=t5 --config.text.t5_config=t5-v1_1-xxl" v5e:4x4
fi
mkdir -p "$OUT"
TIMER=()  # host peak memory of each compile, where GNU time is installed
if [ -x /usr/bin/time ]; then TIMER=(/usr/bin/time -v); fi
while (($# >= 2)); do
  read -r -a words <<< "$1"
  config="${words[0]}" overrides=("${words[@]:1}") topology="$2"
  shift 2
  name="$(echo "${words[*]}-$topology" | tr '/:. =' '_____')"
  reprice=()
  if [ -s "$OUT/$name.json" ]; then
    if [ "${REPRICE:-0}" != 1 ]; then
      echo "== ${words[*]} on $topology: done earlier ($OUT/$name.json)" >&2
      continue
    fi
    reprice=(--reprice)
    # The compile's own log (its host peak memory) stays beside the re-priced one.
    [ -e "$OUT/$name.compile.txt" ] || cp "$OUT/$name.log" "$OUT/$name.compile.txt"
  fi
  echo "== ${words[*]} on $topology" >&2
  (cd "$REPO_ROOT" && PYTHONPATH="$REPO_ROOT" "${TIMER[@]}" "$TPU_PYTHON" -m self_flow.aot \
     --config="$config" --topology="$topology" --markdown --json="$OUT/$name.json" \
     --hlo_dir="$OUT/$name.hlo" "${reprice[@]}" "${overrides[@]}") \
     > "$OUT/$name.log" 2>&1
  echo "   exit $?; $(grep -m1 'Maximum resident' "$OUT/$name.log" | tr -s ' ')" >&2
done
# Memory rows have 12 cells, band rows 10 (awk counts the empty fields outside the edges too).
cat "$OUT"/*.log | awk -F'|' '/^\| configs/ && NF == 14'
echo
cat "$OUT"/*.log | awk -F'|' '/^\| configs/ && NF == 12'
