"""The report of bench/gpu_check.sh: for each training run under OUT/runs, its steps, step time and generation speed,
and its peak CUDA memory (the scripts' memory/*_peak_gib) against the memory plan's prediction for the same
settings on one process; then the step benchmark's table and the tests' last line. Markdown on stdout.

    python bench/gpu_report.py OUT

The plan counts a prompt of PROMPT_TOKENS tokens (the runs' questions are shorter; the plan's activations are an
upper bound for them) and, on CPU (--dry), an 80 GiB GPU; measured memory exists only on CUDA."""

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import memory_plan as mp  # noqa: E402

PROMPT_TOKENS = 256
GIB = 2**30


def flatten(config: dict, prefix: str = "") -> dict:
    """config.json's nested groups as the dotted keys of utils.config.with_overrides."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_row(run_dir: Path, gpu_gib: float) -> str:
    config = json.loads((run_dir / "config.json").read_text())
    script = "multiturn" if "max_turns" in config else "single"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "time/step" in r]
    overrides = {k: v for k, v in flatten(config).items() if k != "preset"}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    args = mp.load_args(script, config["preset"], overrides)
    shape = mp.model_shape(mp.model_config(args.lm.model if args.lm.model in mp.KNOWN_CONFIGS else
                                           str(mp.ROOT / args.lm.model)), args.lora)
    plan = mp.phase_totals(mp.parts(shape, mp.setting_of(args, script, PROMPT_TOKENS), 1, gpu_gib, sharded=False))
    measured = {phase: max((r[f"memory/{phase}_peak_gib"] for r in steps if f"memory/{phase}_peak_gib" in r), default=None)
                for phase in ("rollout", "update")}
    cells = []
    for phase in ("rollout", "update"):
        m, p = measured[phase], plan[phase] / GIB
        cells.append(f"{m:.2f} / {p:.2f} ({m / p:.2f})" if m is not None else f"- / {p:.2f}")
    step_s = statistics.median(r["time/step"] for r in steps) if steps else float("nan")
    gen_s = [r["time/generate"] for r in steps if "time/generate" in r]
    tokens = [sum(v for k, v in r.items() if k.endswith("/completions/mean_length")  # single-turn: per agent
                  or (k.startswith("rollout/") and k.endswith("/turn_length"))) for r in steps]  # multi-turn: per role
    return (f"| {run_dir.name} | {len(steps)} | {step_s:.2f} | {statistics.median(gen_s) if gen_s else float('nan'):.2f} "
            f"| {statistics.mean(tokens) if tokens else 0:.0f} | {cells[0]} | {cells[1]} |")


def main(out: Path) -> None:
    import torch

    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80.0
    print(f"# GPU check\n\n{(out / 'environment.txt').read_text().strip()}\n")
    print("```\n" + (out / "summary.txt").read_text().strip() + "\n```\n")
    print(f"## Training runs (peak CUDA memory, GiB: measured / memory plan for one process of {gpu_gib:.0f} GiB, ratio)\n")
    print("| run | steps | median step s | median generate s | mean completion tokens | rollout peak | update peak |")
    print("|---|---|---|---|---|---|---|")
    for run_dir in sorted(p for p in (out / "runs").iterdir() if (p / "metrics.jsonl").is_file()):
        print(run_row(run_dir, gpu_gib))
    print("\n## Tests\n")
    tests = (out / "tests.log").read_text().strip().splitlines() if (out / "tests.log").is_file() else ["(not run)"]
    print("```\n" + tests[-1] + "\n```\n")
    print("## Step benchmark (bench/step_benchmark.py)\n")
    bench = out / "step_benchmark.json"
    print("```\n" + (json.dumps(json.loads(bench.read_text()), indent=1)[:6000] if bench.is_file() else "(no result)") + "\n```")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
