"""Plot runs from their metrics.jsonl: held-out accuracy against wall-clock time, training reward per agent, and for
multi-turn runs the mean number of turns and the finish-reason fractions of the rollouts.

    python -m utils.plot runs/demo_rema runs/demo_vrp --out docs/learning_curve.png
"""

import argparse
import json
from pathlib import Path


def read(run_dir: Path) -> list[dict]:
    """The run's rows. A resumed run's process starts its clock at 0 again: its rows' times continue from the last
    row written before the resume, so the x axis stays the run's wall-clock time."""
    rows, offset = [], 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if rows and row["time"] + offset < rows[-1]["time"]:
                offset = rows[-1]["time"]
            rows.append(row | {"time": row["time"] + offset})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {run_dir: read(run_dir) for run_dir in args.runs}
    multiturn = any("rollout/mean_turns" in r for rows in runs.values() for r in rows)
    fig, axes = plt.subplots(1, 3 if multiturn else 2, figsize=(18 if multiturn else 12, 4.5))
    ax_eval, ax_reward = axes[0], axes[1]
    for run_dir, rows in runs.items():
        evals = [r for r in rows if "eval/accuracy" in r]
        ax_eval.plot([r["time"] / 60 for r in evals], [100 * r["eval/accuracy"] for r in evals], "o-", label=run_dir.name)
        for prefix in ("meta", "reas", "policy", "rollout"):
            points = [r for r in rows if f"{prefix}/reward" in r]
            if points:
                # markers only: an agent trains in phases, and a line would bridge the phases it sat out
                ax_reward.plot([r["time"] / 60 for r in points], [r[f"{prefix}/reward"] for r in points], "o",
                               markersize=3, label=f"{run_dir.name} {prefix}/reward", alpha=0.8)
        if multiturn:  # the rollouts' turns and how they ended
            points = [r for r in rows if "rollout/mean_turns" in r]
            t = [r["time"] / 60 for r in points]
            axes[2].plot(t, [r["rollout/mean_turns"] for r in points], "-", label=f"{run_dir.name} mean turns")
            for reason in ("normal", "max_turns", "context_exceeded", "truncated"):
                if any(r[f"rollout/finish/{reason}"] > 0 for r in points):
                    axes[2].plot(t, [r[f"rollout/finish/{reason}"] for r in points], "--",
                                 label=f"{run_dir.name} finish/{reason} (share)")
    ax_eval.set(xlabel="wall-clock minutes", ylabel="held-out accuracy, greedy (%)", title="eval/accuracy")
    ax_reward.set(xlabel="wall-clock minutes", ylabel="mean reward of the step", title="training reward per agent")
    if multiturn:
        axes[2].set(xlabel="wall-clock minutes", ylabel="turns / share of trajectories", title="rollout turns and finish reasons")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
