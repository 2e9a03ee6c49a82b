"""The table and plot of bench/default_run.sh: for each run of a default command (rema_single.py, rema_multiturn.py;
3 seeds x bf16 on / off), held-out accuracy at the start and the end with the change's standard error, steps, wall
minutes, each agent's rollout reward at its first and last step, and the share of each agent's steps that had a
signal to learn from (rewards not all equal and a non-zero gradient).

    python bench/default_run_report.py RUNS_DIR --out docs/evidence/default_run

RUNS_DIR holds one directory per run (metrics.jsonl, config.json, wall_seconds written by the script).
"""

import argparse
import json
import math
from pathlib import Path

# per script: agent -> (reward key, reward-std key, gradient-norm key) in metrics.jsonl
AGENT_KEYS = {
    "rema_single": {"RA": ("reas/reward", "reas/reward_std", "reas/grad_norm"),
                    "MTA": ("meta/reward", "meta/reward_std", "meta/grad_norm")},
    # one model plays both agents, each trajectory trains both on the same group advantage
    "rema_multiturn": {"both": ("rollout/reward", "rollout/reward_std", "train/grad_norm")},
}


def summarize(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["step"], r["eval/accuracy"], r.get("eval/questions")) for r in rows if "eval/accuracy" in r]
    script = "rema_multiturn" if "max_turns" in config else "rema_single"
    (s0, a0, n0), (s1, a1, n1) = evals[0], evals[-1]
    n = n1 or config["data"]["eval_limit"]
    se = math.sqrt(a0 * (1 - a0) / n + a1 * (1 - a1) / n)
    out = dict(run=run.name, script=script, seed=config["run"]["seed"], bf16=config["lm"]["bf16"], questions=n,
               acc_start=a0, acc_end=a1, change=a1 - a0, se=se, steps=s1,
               minutes=float((run / "wall_seconds").read_text()) / 60 if (run / "wall_seconds").exists() else None,
               commit=(run / "commit").read_text().strip() if (run / "commit").exists() else "n/a",
               curve=[(s, a) for s, a, _ in evals])
    for agent, (reward, std, grad) in AGENT_KEYS[script].items():
        steps = [r for r in rows if reward in r]
        if not steps:
            continue
        signal = [r.get(std, 0) > 0 and r.get(grad, 0) > 0 for r in steps]
        out[agent] = dict(steps=len(steps), reward_first=steps[0][reward], reward_last=steps[-1][reward],
                          signal=sum(signal) / len(signal), rewards=[(r["step"], r[reward]) for r in steps])
    return out


def table(results: list[dict]) -> str:
    lines = ["| script | commit | seed | bf16 | held-out start | end | change (SE) | steps | minutes | agent: reward first "
             "-> last (steps with signal) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        agents = "; ".join(f"{a}: {r[a]['reward_first']:+.2f} -> {r[a]['reward_last']:+.2f} ({r[a]['signal']:.0%} of "
                           f"{r[a]['steps']})" for a in ("RA", "MTA", "both") if a in r)
        minutes = f"{r['minutes']:.1f}" if r["minutes"] is not None else "n/a"
        lines.append(f"| {r['script']}.py | {r['commit']} | {r['seed']} | {'on' if r['bf16'] else 'off'} | {r['acc_start']:.0%} | "
                     f"{r['acc_end']:.0%} | {100 * r['change']:+.0f} ({100 * r['se']:.1f}) | {r['steps']} | {minutes} | "
                     f"{agents} |")
    return "\n".join(lines)


def verdict(results: list[dict], gain: float = 0.20, minutes: float = 15.0, signal: float = 0.8) -> str:
    """One line per script: did every run gain `gain` within `minutes`, with a signal in `signal` of each agent's steps?"""
    out = []
    for script in sorted({r["script"] for r in results}):
        runs = [r for r in results if r["script"] == script]
        ok_gain = sum(r["change"] >= gain - 1e-9 for r in runs)
        ok_time = sum(r["minutes"] is not None and r["minutes"] <= minutes for r in runs)
        ok_signal = sum(all(r[a]["signal"] >= signal for a in ("RA", "MTA", "both") if a in r) for r in runs)
        changes = [100 * r["change"] for r in runs]
        out.append(f"{script}.py, {len(runs)} runs: change {min(changes):+.0f} to {max(changes):+.0f} points "
                   f"(mean {sum(changes) / len(changes):+.1f}); >= +{100 * gain:.0f} points in {ok_gain}/{len(runs)}; "
                   f"<= {minutes:.0f} min in {ok_time}/{len(runs)}; every agent with signal in >= {signal:.0%} of its "
                   f"steps in {ok_signal}/{len(runs)}")
    return "\n".join(out)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scripts = sorted({r["script"] for r in results})
    fig, axes = plt.subplots(2, len(scripts), figsize=(6 * len(scripts), 7), squeeze=False)
    for col, script in enumerate(scripts):
        for r in (r for r in results if r["script"] == script):
            label = f"seed {r['seed']}, bf16 {'on' if r['bf16'] else 'off'}"
            steps, acc = zip(*r["curve"])
            axes[0][col].plot(steps, [100 * a for a in acc], marker="o", label=label)
            for agent, style in (("RA", "-"), ("MTA", "--"), ("both", "-")):
                if agent in r:
                    s, v = zip(*r[agent]["rewards"])
                    axes[1][col].plot(s, v, style, alpha=0.7, label=f"{agent}, {label}")
        axes[0][col].set(title=f"{script}.py: held-out accuracy (greedy)", xlabel="step", ylabel="%")
        axes[1][col].set(title="rollout reward (RA: R_l; MTA: R_h; multi-turn: both agents')", xlabel="step")
        axes[0][col].legend(fontsize=7)
        axes[1][col].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/evidence/default_run"))
    parser.add_argument("--machine", default="", help="a line naming the machine, printed above the table")
    a = parser.parse_args()
    runs = sorted(p for p in a.runs.iterdir() if (p / "metrics.jsonl").is_file() and (p / "config.json").is_file())
    results = [summarize(run) for run in runs]
    a.out.mkdir(parents=True, exist_ok=True)
    text = (f"{a.machine}\n\n" if a.machine else "") + table(results) + "\n\n" + verdict(results) + "\n"
    (a.out / "table.md").write_text(text)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, a.out / "curve.png")
    print(text)


if __name__ == "__main__":
    main()
