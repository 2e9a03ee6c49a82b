"""Plot runs from their metrics.jsonl: held-out accuracy against wall-clock time, and training reward per agent.

    python -m utils.plot runs/demo_rema runs/demo_vrp --out docs/learning_curve.png
"""

import argparse
import json
from pathlib import Path


def read(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eval, ax_reward) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run_dir in args.runs:
        rows = read(run_dir)
        evals = [r for r in rows if "eval/accuracy" in r]
        ax_eval.plot([r["time"] / 60 for r in evals], [100 * r["eval/accuracy"] for r in evals], "o-", label=run_dir.name)
        for prefix in ("meta", "reas", "policy"):
            points = [r for r in rows if f"{prefix}/reward" in r]
            if points:
                # markers only: an agent trains in phases, and a line would bridge the phases it sat out
                ax_reward.plot([r["time"] / 60 for r in points], [r[f"{prefix}/reward"] for r in points], "o",
                               markersize=3, label=f"{run_dir.name} {prefix}/reward", alpha=0.8)
    ax_eval.set(xlabel="wall-clock minutes", ylabel="held-out accuracy, greedy (%)", title="eval/accuracy")
    ax_reward.set(xlabel="wall-clock minutes", ylabel="mean reward of the step", title="training reward per agent")
    for ax in (ax_eval, ax_reward):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
