"""What both training scripts do around their algorithm, behind one object, so that their main() shows only the
algorithm's loops: the model files, tokenizer, grader, task and data, the agents, the sampler, the logs, the
checkpoints, the guard against non-finite steps and SIGTERM, the held-out evaluation between steps, each step's
timings and the end of the run.

    run = Run(args, accelerator, "rema_single.py", lengths)   # everything loaded; run.state: where to start
    run.start(header, expected_steps, evaluate, "single")       # the header, the progress bar, the evaluation to run
    with run.session():                                         # SIGTERM: save the last step; the end: evaluate, save
        for ...:
            run.between_steps()                                 # the evaluation and checkpoint due after the last step
            t0 = run.step_began()                               # the step's timers reset
            ... rollout -> rewards ...
            timing = run.rollout_done(t0)
            ... advantages -> update -> metrics ...
            if not run.step_done(metrics, t0, timing, shows, shown):  # False when --max_minutes is up
                break
"""

import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from accelerate.utils import gather_object, set_seed

from utils import memory_plan
from utils.checkpoint import Checkpointer
from utils.config import warn_if_scales_mix
from utils.distributed import peak_memory
from utils.faults import NonFiniteGuard, Preempted, Preemption
from utils.grading import Grader
from utils.models import build_agents, load_tokenizer, resolve_model, training_autocast
from utils.sampling import make_sampler
from utils.task import TASKS
from utils.tracking import RunLogger, RunProgress


class Run:
    """One training run's plumbing, loaded in this order (the random state a run starts from depends on it): the
    model files (converted once per node), tokenizer, grader, task and data, the agents (`lengths`: agent -> its max
    new tokens), the global seed, SIGTERM handling, the sampler, the logs, the checkpoints (and with --resume the
    latest one: `state`), the non-finite guard."""

    def __init__(self, args, accelerator, prog: str, lengths: dict[str, int], reference: bool = False,
                 initial_state: dict | None = None, **sampler_options):
        self.args, self.accelerator, self.prog = args, accelerator, prog
        self.main_proc = accelerator.is_main_process
        self.run_dir = Path(args.run.output_dir) / args.run.exp_name
        self.autocast = training_autocast(accelerator.device, args.lm.bf16)
        with accelerator.local_main_process_first():  # the GGUF -> safetensors conversion: once per node
            self.path = resolve_model(args.lm.model)
        self.tokenizer = load_tokenizer(self.path)
        self.grader = (Grader(args.grading.timeout, args.grading.workers, args.grading.grader)
                       if args.data.task == "math" else None)
        self.task = TASKS[args.data.task](self.tokenizer, self.grader, args.one_shot)
        self.train_set, self.eval_set = self.task.load(args)
        self.agents = build_agents(args, accelerator, self.path, lengths, reference=reference)
        warn_if_scales_mix(args, next(iter(self.agents.values())).unwrapped, accelerator.num_processes, prog)
        set_seed(args.run.seed, device_specific=True)  # the global RNGs (mini-batch order); samples use seeded streams
        self.preemption = Preemption()  # SIGTERM: stop the step, save the last completed one, exit with status 0
        self.sampler = make_sampler(args, accelerator, self.path, self.tokenizer, self.preemption, **sampler_options)
        self.logger = RunLogger(self.run_dir, asdict(args), enabled=self.main_proc, track=args.run.track,
                                wandb_project=args.wandb.project, wandb_entity=args.wandb.entity,
                                run_name=args.run.exp_name)
        self.ckpt = Checkpointer(accelerator, self.run_dir, self.agents, self.tokenizer, args.run.keep_checkpoints,
                                 args.run.save_every, args.run.save_every_minutes)
        self.guard = NonFiniteGuard(args.optim.max_skipped_steps, prog)  # skips steps with a NaN / inf gradient
        self.state = self.ckpt.resume(args.run.resume, self.logger) or \
            dict(step=0, evaluated_at=None) | (initial_state or {})
        self._checked = None  # (step, phase_end) of the last between_steps() that ran

    def start(self, header: dict[str, str], expected_steps: int | list[int], evaluate, kind: str) -> None:
        """The header (with several processes: whether the run fits its GPUs, utils/memory_plan.py), the progress
        bar over expected_steps, and the evaluation: evaluate() -> metrics of the held-out set."""
        if self.accelerator.num_processes > 1 and self.main_proc:
            header = header | {"memory": memory_plan.header(self.args, kind, self.path, self.accelerator)}
        self.evaluate = evaluate
        self.progress = RunProgress(self.run_dir, self.state["step"], self.state.get("training_seconds", 0.0),
                                    enabled=self.main_proc, header=header)
        self.progress.expect(expected_steps)

    def _evaluate_now(self) -> None:
        self.logger.log(self.progress.evaluated(self.evaluate), self.state["step"])
        self.state["evaluated_at"] = self.state["step"]

    def between_steps(self, phase_end: bool = False) -> None:
        """The last completed step's evaluation (at the start and every --eval_every steps) and checkpoint, when due,
        once per step: a resumed run never evaluates a step twice. A SIGTERM that came meanwhile stops the run here."""
        step = self.state["step"]
        if self._checked == (step, phase_end):
            return
        every = self.args.run.eval_every and step % self.args.run.eval_every == 0
        if self.state.get("evaluated_at") != step and (step == 0 or every):
            self._evaluate_now()
        if step > 0 and self.ckpt.due(step, phase_end):
            self.ckpt.save(self.state)
        self._checked = (step, phase_end)
        self.preemption.check(self.accelerator)

    def step_began(self) -> float:
        """Before a step's rollout: its timers reset; returns its start time."""
        self.sampler.times.clear()
        return time.time()

    def rollout_done(self, t0: float) -> dict:
        """After a step's rollout: its time and (CUDA) the peak memory so far."""
        return {"time/rollout": time.time() - t0} | peak_memory(self.accelerator, "rollout")

    def step_done(self, metrics: dict, t0: float, timing: dict, shows: list[dict], shown: dict[str, float]) -> bool:
        """After a step's update: the position advances (with the training time, so --max_minutes spans resumes);
        the step's metrics, with its timings and counters, and every --transcripts_every steps a few transcripts
        (`shows`, this process's) are logged; `shown` goes beside the progress bar; t0 and timing: from step_began() and
        rollout_done(). False when --max_minutes is up."""
        state, args, progress = self.state, self.args, self.progress
        state["step"] += 1
        state["training_seconds"] = progress.training_time()
        metrics |= peak_memory(self.accelerator, "update") | {f"time/{k}": v for k, v in self.sampler.times.items()}
        metrics |= timing | {"time/step": time.time() - t0, "time/elapsed": progress.elapsed(),
                             "time/training": progress.training_time(),
                             "train/skipped_steps": float(self.guard.skipped),
                             "grader/timeouts": float(self.grader.num_timeouts if self.grader else 0)}
        self.logger.log(metrics, state["step"])
        if args.run.transcripts_every and state["step"] % args.run.transcripts_every == 0:
            n = args.run.num_transcripts
            self.logger.log_transcripts(gather_object(shows[:n])[:n], state["step"])
        progress.step(state["step"], shown)
        return not progress.time_is_up(self.accelerator, args.run.max_minutes)

    @contextmanager
    def session(self):
        """The loops run inside. At their end the last step is evaluated and saved (a resumed run that had finished
        is not evaluated twice); on SIGTERM (rollout, filtering and evaluation stop at once) the last completed step
        is saved and the run exits with status 0; always, the logs, sampler, grader and processes are closed."""
        try:
            yield
            if self.state.get("evaluated_at") != self.state["step"]:
                self._evaluate_now()
                self.ckpt.save(self.state)
                self.progress.finish(self.logger, self.ckpt)
            elif self.main_proc:
                print(f"{self.run_dir} had finished at step {self.state['step']}: nothing left to do")
        except Preempted:  # the weights are the last completed step's
            self.ckpt.save(self.state)
            if self.main_proc:
                print(f"SIGTERM: saved the checkpoint of step {self.state['step']} in {self.run_dir}; "
                      f"resume with --resume {self.run_dir}")
        finally:
            self.logger.close()
            self.sampler.close()
            if self.grader is not None:
                self.grader.close()
            self.accelerator.end_training()


def single_turn_header(args, steps: int, phases: list[str], num_agents: int) -> dict[str, str]:
    """What rema_single.py prints first: the run, its schedule (the agent of each phase) and its update (steps:
    optimizer steps per rollout, PPO epochs included)."""
    return {"run": f"{args.mode} on {args.data.task} ({args.data.train_dataset}) with {args.lm.model}, preset {args.preset}",
            "schedule": f"{args.schedule}: {' -> '.join(phases[:num_agents])} ({len(phases)} phases"
                        + (f", {args.total_steps} steps)" if args.schedule == "switch" else ")"),
            "update": f"{args.advantage_estimator}, {steps} optimizer step(s) per rollout"
                      + (" (the PPO ratio stays 1)" if steps == 1 else "")
                      + f" of {args.rollout_batch_size * args.num_generations} sequences; each step logs its own count"
                        " (<agent>/optimizer_steps)"}


def multi_turn_header(args, sequences: int, steps: int) -> dict[str, str]:
    """What rema_multiturn.py prints first: the run, its rollout and its update (sequences trained per step; steps:
    optimizer steps per rollout, PPO epochs included)."""
    return {"run": f"multi-turn ReMA on {args.data.task} ({args.data.train_dataset}) with {args.lm.model}, preset {args.preset}",
            "rollout": f"{args.max_turns} turns of {args.max_completion_length} tokens, reward mask "
                       f"{'on' if args.mask_unfinished_reward else 'off'}, "
                       f"stop on truncation {'on' if args.stop_when_truncated else 'off'}",
            "update": f"{args.advantage_estimator}, {steps} optimizer step(s) per rollout"
                      + (" (the PPO ratio stays 1)" if steps == 1 else "")
                      + f" of {sequences} sequences; each step logs its own count (<prefix>/optimizer_steps)"}
