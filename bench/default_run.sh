#!/usr/bin/env bash
# The README's default commands, as a new user runs them, 3 seeds x bf16 autocast on / off, one run at a time (each
# run has the whole machine, so its wall time is the user's), then the table and plot in docs/evidence/default_run/.
#   bash bench/default_run.sh               # both scripts: 12 runs
#   bash bench/default_run.sh single        # rema_single.py only (6 runs); `multi`: rema_multiturn.py only
# A run differs from the bare command only in --seed, --bf16 / --no-bf16 and where it writes; its checkpoints are
# deleted when it ends (2 GB each); a finished run is not run again (delete its directory to redo it).
# Runs go to $OUT (default runs/default_run); metrics.jsonl, config.json and the console's last lines of each run go to
# docs/evidence/default_run/<run>/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-runs/default_run}
DOCS=docs/evidence/default_run
which=${1:-both}
mkdir -p "$OUT" "$DOCS"
for script in single multiturn; do
  [[ $which == both || $which == "$script" || ($which == multi && $script == multiturn) ]] || continue
  for seed in 1 2 3; do
    for bf16 in bf16 no-bf16; do
      name=${script}_seed${seed}_${bf16}
      if [[ -f $OUT/$name/wall_seconds ]]; then continue; fi
      rm -rf "${OUT:?}/$name"
      start=$(date +%s)
      .venv/bin/python "rema_$script.py" --seed "$seed" "--$bf16" --output_dir "$OUT" --exp_name "$name" \
        > "$OUT/$name.log" 2>&1
      echo $(( $(date +%s) - start )) > "$OUT/$name/wall_seconds"
      git rev-parse --short HEAD > "$OUT/$name/commit"
      rm -rf "${OUT:?}/$name/checkpoints"
      mkdir -p "$DOCS/$name"
      cp "$OUT/$name/metrics.jsonl" "$OUT/$name/config.json" "$OUT/$name/wall_seconds" "$OUT/$name/commit" "$DOCS/$name/"
      grep -a "^done:\|^phase\|^run:\|^update:\|^schedule:" "$OUT/$name.log" | tr '\r' '\n' | grep -a "^done:\|^phase\|^run:\|^update:\|^schedule:" \
        > "$DOCS/$name/console.txt" || true
      tail -n 1 "$DOCS/$name/console.txt"
    done
  done
done
machine="$(lscpu | grep -m1 'Model name' | sed 's/ *Model name: *//'), $(nproc) cores, bf16 instructions: \
$(grep -q avx512_bf16 /proc/cpuinfo && echo yes || echo no); table written $(date -u +%F) (each run's commit: its row)"
.venv/bin/python bench/default_run_report.py "$DOCS" --out "$DOCS" --machine "$machine"
