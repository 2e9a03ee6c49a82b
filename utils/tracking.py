"""Run logging: TensorBoard always, Weights & Biases behind --track, metrics.jsonl and transcripts.jsonl.

Only the main process writes. `metrics.jsonl` has one object per logged step, `{"step": k, "time": s, name: value}`,
so a run can be plotted with ten lines of pandas; `transcripts.jsonl` has full rollouts (question, plan, solution,
reward) every few steps, for reading what the agents actually say. The scripts' step metrics (TRL's names, reduced
over the processes) are built here too: `single_turn_step_metrics`, `multi_turn_step_metrics`.
"""

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from utils.distributed import reduce_sums


class RunLogger:
    def __init__(self, run_dir: Path, config: dict, *, enabled: bool, track: bool = False,
                 wandb_project: str = "rema", wandb_entity: str | None = None, run_name: str = ""):
        self.enabled = enabled
        self.start = time.time()
        self.wandb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")
        self.transcripts_file = open(run_dir / "transcripts.jsonl", "a")
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
        with open(run_dir / "config.json", "w") as f:
            json.dump(config, f, indent=2, default=str)
        if track:
            import wandb  # only needed with --track

            self.wandb = wandb.init(project=wandb_project, entity=wandb_entity, name=run_name, config=config,
                                    dir=str(run_dir), resume="allow", id=run_name.replace("/", "_"))

    def rewind(self, step: int) -> None:
        """On resume from the checkpoint of `step`: drop the rows logged after it (the resumed run logs those steps
        again), and a last line cut off by a kill, so that metrics.jsonl reads as one uninterrupted run."""
        if not self.enabled:
            return
        for name in ("metrics_file", "transcripts_file"):
            f = getattr(self, name)
            f.close()
            path = Path(f.name)
            kept = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # only a kill mid-write leaves a partial line
                    continue
                if row.get("step", 0) <= step:
                    kept.append(line + "\n")
            path.write_text("".join(kept))
            setattr(self, name, open(path, "a"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        for name, value in metrics.items():
            if math.isfinite(value):
                self.writer.add_scalar(name, value, step)
        row = {"step": step, "time": round(time.time() - self.start, 2), **metrics}
        self.metrics_file.write(json.dumps(row) + "\n")  # NaN/inf are written as NaN/Infinity: visible, not hidden
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_transcripts(self, rows: list[dict], step: int) -> None:
        if not self.enabled or not rows:
            return
        for row in rows:
            self.transcripts_file.write(json.dumps({"step": step, **row}) + "\n")
        self.transcripts_file.flush()
        text = "\n\n---\n\n".join("\n\n".join(f"**{k}**: {v}" for k, v in row.items()) for row in rows)
        self.writer.add_text("transcripts", text, step)

    def first_and_last(self, key: str) -> tuple[float, float] | None:
        """The first and the last value of `key` in metrics.jsonl (over resumes too), or None if never logged."""
        self.metrics_file.flush()
        values = [row[key] for row in map(json.loads, Path(self.metrics_file.name).read_text().splitlines()) if key in row]
        return (values[0], values[-1]) if values else None

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics_file.close()
        self.transcripts_file.close()
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def accuracy_change(before: float, after: float, n: int | None) -> str:
    """'change +0.220, standard error 0.060 over 100 questions: beyond noise (2 SE = 0.120)'. The standard error
    treats the two evaluations as independent samples of n questions, sqrt(p0 (1 - p0) / n + p1 (1 - p1) / n): on the
    same questions the true one is smaller, so "within noise" (|change| < 2 standard errors) is cautious."""
    if not n:
        return f"change {after - before:+.3f}"
    se = math.sqrt(before * (1 - before) / n + after * (1 - after) / n)
    verdict = "within noise" if abs(after - before) < 2 * se else "beyond noise"
    return f"change {after - before:+.3f}, standard error {se:.3f} over {int(n)} questions: {verdict} (2 SE = {2 * se:.3f})"


class RunProgress:
    """What a person watching the run sees: a short header (what runs, where the logs go, how to watch them), one
    progress bar over the whole run with a total and an ETA, a line per phase, and a summary line at the end."""

    def __init__(self, run_dir: Path, initial_step: int, trained_before: float, enabled: bool, header: dict[str, str]):
        self.run_dir, self.enabled, self.start, self.done = run_dir, enabled, time.time(), initial_step
        self.trained_before = trained_before  # training seconds of the processes before a resume, up to its checkpoint
        self.eval_seconds = 0.0  # spent in evaluation: not training time
        if enabled:
            for key, value in header.items():
                print(f"{key}: {value}")
            print(f"logs: {run_dir}/metrics.jsonl (one row per step), config.json, transcripts.jsonl; watch with "
                  f"`tensorboard --logdir {run_dir}/tensorboard`; plot with `python -m utils.plot {run_dir} --out curve.png`")
        # (delay: the bar is first drawn by expect(), with its total, not before as "0step")
        self.bar = tqdm(desc="train", unit="step", initial=initial_step, disable=not enabled, dynamic_ncols=True,
                        delay=1e-3)
        self.plan: list[int] | None = None  # a phased run: the steps of each phase

    def expect(self, steps: int | list[int]) -> None:
        """The run's length: a number of steps, or the steps of each phase (estimates, replaced phase by phase)."""
        self.plan = steps if isinstance(steps, list) else None
        self.bar.total = sum(steps) if isinstance(steps, list) else steps
        self.bar.refresh()

    def phase(self, phase: int, agent: str, stats: dict, steps: int) -> None:
        """A phase begins with `steps` steps (its dataset is built): the total becomes the steps done, this phase's,
        and the estimates of the phases after it."""
        if self.plan is not None:
            self.plan[phase] = steps
            self.bar.total = self.done + sum(self.plan[phase:])
            self.bar.refresh()
        if self.enabled:
            self.bar.write(f"phase {phase + 1}/{len(self.plan or [0])} ({agent}): {steps} steps; " +
                           ", ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in stats.items()))

    def step(self, step: int, shown: dict[str, float]) -> None:
        self.bar.update(step - self.done)
        self.done = step
        self.bar.set_postfix({k.split("/")[0]: f"{v:.3f}" for k, v in shown.items()}, refresh=False)

    def elapsed(self) -> float:
        return time.time() - self.start

    def training_time(self) -> float:
        """Seconds of the run spent on anything but evaluation: this process's, and before a resume those up to the
        checkpoint it resumed from."""
        return self.trained_before + self.elapsed() - self.eval_seconds

    def evaluated(self, evaluate, *args) -> dict:
        """evaluate(*args), timed as evaluation; its metrics with the training time so far (time/training)."""
        t0 = time.time()
        metrics = evaluate(*args)
        self.eval_seconds += time.time() - t0
        return metrics | {"time/training": self.training_time()}

    def time_is_up(self, accelerator, max_minutes: float | None) -> bool:
        """Collective: has the run trained for its --max_minutes (evaluation excluded) on any process?"""
        late = max_minutes is not None and self.training_time() >= 60 * max_minutes
        return accelerator.reduce(torch.tensor(float(late), device=accelerator.device), reduction="max").item() > 0

    def finish(self, logger: RunLogger, checkpoint) -> None:
        """The summary line: held-out accuracy before and after, run time, where the checkpoint is."""
        self.bar.close()
        if not self.enabled:
            return
        accuracy, questions = logger.first_and_last("eval/accuracy"), logger.first_and_last("eval/questions")
        change = f"eval/accuracy {accuracy[0]:.3f} -> {accuracy[1]:.3f}" if accuracy else "no evaluation"
        noise = f"; {accuracy_change(*accuracy, questions[1] if questions else None)}" if accuracy else ""
        print(f"done: {change} (step 0 -> {self.done}) in {self.elapsed() / 60:.1f} min; checkpoint "
              f"{checkpoint.run_dir}/checkpoints/step_{checkpoint.saved_step:06d} (--resume {self.run_dir}; eval.py --model "
              f"<checkpoint>/<agent>){noise}")


def update_metrics(p: str, s: dict[str, float], learning_rate: float, world: int, per: str = "tokens") -> dict:
    """A PPO update's metrics under prefix p (TRL's names), from its statistics summed over the processes (s): the
    clip ratios per clipped unit (s[per]: tokens, or turns under the turn-level ratio), the entropy and |log pi/pi_old|
    per token, the loss and gradient norm per applied optimizer step, the steps each process applied, and with vLLM the importance
    weights against its samples."""
    units, tok, steps = max(s[per], 1.0), max(s["tokens"], 1.0), max(s["steps"], 1.0)
    out = {f"{p}/clip_ratio/low_mean": s["clip_low"] / units, f"{p}/clip_ratio/high_mean": s["clip_high"] / units,
           f"{p}/clip_ratio/region_mean": (s["clip_low"] + s["clip_high"]) / units, f"{p}/entropy": s["entropy"] / tok,
           f"{p}/log_ratio_abs_mean": s["log_ratio"] / tok,  # exactly 0 while pi_old is the policy (ratio 1)
           f"{p}/loss": s["loss"] / (world * steps),  # mean over the applied optimizer steps
           f"{p}/grad_norm": s["grad_norm"] / steps, f"{p}/optimizer_steps": s["steps"] / world,  # on each process
           f"{p}/learning_rate": learning_rate}
    if s["is_units"] > 0:
        out |= {"vllm/is_weight_mean": s["is_weight"] / s["is_units"], "vllm/is_capped_frac": s["is_over_cap"] / s["is_units"]}
    return out


def filter_stats(candidates: int, kept: list[dict], succ: list[float]) -> dict:
    """The prompt filter's metrics: the candidates, the questions kept and the dataset's items (D_l: a question per
    plan), and over the candidates the mean success rate and the shares all right / all wrong (succ: [] unfiltered)."""
    stats = {"filter/candidates": candidates, "filter/kept": len({q["index"] for q in kept}), "filter/items": len(kept)}
    if succ:
        stats |= {"filter/mean_succ": sum(succ) / len(succ),
                  "filter/frac_all_correct": sum(s == 1.0 for s in succ) / len(succ),
                  "filter/frac_all_wrong": sum(s == 0.0 for s in succ) / len(succ)}
    return stats


def single_turn_step_metrics(p: str, rollout: dict, mask, sums: dict, is_stats: dict, G: int, learning_rate: float,
                             accelerator) -> dict:
    """rema_single.py's step metrics under the agent's prefix p, over the global batch (TRL's names): the rollout's
    rewards (groups of G consecutive), correctness and completion lengths (mask: (N, C)), then the update's."""
    rewards, lengths = torch.tensor(rollout["rewards"]), mask.sum(-1)  # (N,), (N,)
    r_group = rewards.view(-1, G)  # (N/G, G)
    local = {k: sums.get(k, 0.0) for k in ("loss", "clip_low", "clip_high", "entropy", "tokens", "kl", "grad_norm", "steps",
                                          "log_ratio")}
    local |= {k: is_stats.get(k, 0.0) for k in ("is_weight", "is_over_cap", "is_units")} | {
        "r_sum": rewards.sum(), "r_sq": (rewards**2).sum(), "n": len(rewards), "len_sum": lengths.sum(),
        "truncated": sum(c.truncated for c in rollout["completions"]), "groups": len(r_group),
        "zero_std": (r_group.std(-1) < 1e-6).sum() if G > 1 else 0, "correct": sum(rollout["correct"]),
        "n_correct": len(rollout["correct"])}
    s = reduce_sums(accelerator, {k: float(v) for k, v in local.items()})
    all_lengths = accelerator.gather(lengths)  # (N * world,)
    tok, n = max(s["tokens"], 1.0), s["n"]
    metrics = {f"{p}/reward": s["r_sum"] / n, f"{p}/reward_std": math.sqrt(max(s["r_sq"] / n - (s["r_sum"] / n) ** 2, 0.0)),
               f"{p}/frac_reward_zero_std": s["zero_std"] / s["groups"], f"{p}/accuracy": s["correct"] / s["n_correct"],
               f"{p}/completions/mean_length": s["len_sum"] / n, f"{p}/completions/min_length": all_lengths.min().item(),
               f"{p}/completions/max_length": all_lengths.max().item(), f"{p}/completions/clipped_ratio": s["truncated"] / n}
    metrics |= update_metrics(p, s, learning_rate, accelerator.num_processes)
    return metrics | ({f"{p}/kl": s["kl"] / tok} if "kl" in sums else {})


def multi_turn_step_metrics(p: str, rewards, sums: dict, is_stats: dict, G: int, learning_rate: float, accelerator) -> dict:
    """rema_multiturn.py's step metrics over the global batch (TRL's names): the spread of the trajectories' rewards
    (N,) in groups of G consecutive, then the update's under prefix p (train, or train/<agent> with separate
    parameters), its clip counts per unit (turns under the turn-level ratio)."""
    r_group = rewards.view(-1, G)  # (N/G, G)
    local = {k: sums.get(k, 0.0) for k in ("loss", "clip_low", "clip_high", "clip_dual", "units", "entropy", "tokens",
                                          "grad_norm", "steps", "log_ratio")}
    local |= {k: is_stats.get(k, 0.0) for k in ("is_weight", "is_over_cap", "is_units")} | {
        "zero_std": (r_group.std(-1) < 1e-6).sum() if G > 1 else 0, "groups": len(r_group)}
    s = reduce_sums(accelerator, {k: float(v) for k, v in local.items()})
    metrics = {"rollout/frac_reward_zero_std": s["zero_std"] / s["groups"],
               "rollout/reward_std": float(accelerator.gather(rewards).std()) if s["groups"] * G > 1 else 0.0,
               f"{p}/clip_ratio/dual_mean": s["clip_dual"] / max(s["units"], 1.0), f"{p}/tokens": s["tokens"]}
    return metrics | update_metrics(p, s, learning_rate, accelerator.num_processes, "units")
