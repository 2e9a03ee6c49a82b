"""Held-out accuracy of several methods over training time, several seeds each: a table and a plot.

    python bench/compare_methods.py runs/cmp/rema_s1 runs/cmp/rema_s2 ... --out docs/evidence/decomposition

Each run directory is grouped by its config.json's `mode` (rema, vrp, mrp). Its evaluation rows (`eval/accuracy`,
greedy, the same held-out set for every run) are placed on the training-time axis (`time/training`: minutes of the
run outside evaluation, so a method whose evaluation is slower is not charged for it). Writes `<out>.md` (per method:
the accuracy at the start and at the end, mean and spread over seeds; the accuracy at fixed training times,
interpolated between evaluations) and `<out>.png` (mean over seeds, with the range of the seeds shaded).
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def evals(run_dir: Path) -> list[tuple[float, float]]:
    """(training minutes, accuracy) of every evaluation row of a run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r.get("time/training", 0.0) / 60, r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]


def at(points: list[tuple[float, float]], minute: float) -> float | None:
    """The accuracy at `minute` by linear interpolation between evaluations (None past the last one)."""
    for (t0, a0), (t1, a1) in zip(points, points[1:]):
        if t0 <= minute <= t1:
            return a0 + (a1 - a0) * (minute - t0) / max(t1 - t0, 1e-9)
    return points[0][1] if points and minute <= points[0][0] else None


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} +- {100 * sd:.1f} (min {100 * min(values):.0f}, max {100 * max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output path without extension")
    parser.add_argument("--minutes", type=float, nargs="+", default=[0, 5, 10, 15, 20, 25, 30])
    args = parser.parse_args()

    by_method = defaultdict(dict)
    for run_dir in args.runs:
        config = json.loads((run_dir / "config.json").read_text())
        by_method[config["mode"]][run_dir.name] = evals(run_dir)
    lines = ["| method | runs | held-out accuracy at the start (%) | at the end (%) | end, training minutes |",
             "|---|---|---|---|---|"]
    for method, runs in by_method.items():
        starts, ends = [p[0][1] for p in runs.values()], [p[-1][1] for p in runs.values()]
        minutes = [p[-1][0] for p in runs.values()]
        lines.append(f"| {method} | {len(runs)} | {spread(starts)} | {spread(ends)} | "
                     f"{min(minutes):.1f}-{max(minutes):.1f} |")
    lines += ["", "| method | " + " | ".join(f"{m:g} min" for m in args.minutes) + " |",
              "|---|" + "---|" * len(args.minutes)]
    for method, runs in by_method.items():
        cells = []
        for minute in args.minutes:
            values = [v for v in (at(p, minute) for p in runs.values()) if v is not None]
            cells.append(f"{100 * statistics.mean(values):.1f} ({len(values)})" if values else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("\n(cells: mean accuracy over the seeds whose run reached that training time, interpolated between "
                 "evaluations; in parentheses how many)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, runs in by_method.items():
        end = min(p[-1][0] for p in runs.values())
        grid = [end * i / 50 for i in range(51)]
        values = [[at(p, m) for p in runs.values()] for m in grid]
        mean = [statistics.mean(v) * 100 for v in values]
        line, = ax.plot(grid, mean, label=f"{method} (mean of {len(runs)} seeds)")
        ax.fill_between(grid, [min(v) * 100 for v in values], [max(v) * 100 for v in values], alpha=0.2,
                        color=line.get_color())
        for p in runs.values():
            ax.plot([t for t, _ in p], [100 * a for _, a in p], "o", markersize=3, color=line.get_color(), alpha=0.6)
    ax.set(xlabel="training minutes (evaluation excluded)", ylabel="held-out accuracy, greedy (%)",
           title="held-out accuracy over training time (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
