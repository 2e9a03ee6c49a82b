"""Checkpoints that survive a kill: written to `step_K.tmp/`, renamed to `step_K/` when complete, then `latest` is
replaced atomically. A kill at any moment leaves `latest` pointing at the last complete checkpoint.

Layout of `run_dir/checkpoints/step_K/`:
    accelerate_state/   accelerator.save_state: models, optimizers and every rank's RNG states (sharded under FSDP2),
                        and fresh_optimizers.json: which optimizers had taken no step yet (see `save_checkpoint`)
    <agent>/            each agent in Hugging Face format (a full model, or a LoRA adapter), loadable by eval.py
    trainer_state.json  step counter, schedule position and the filtered dataset of the current phase
"""

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch


class _TiedWeightsNotice(logging.Filter):
    """`save_state` writes each model as safetensors, which cannot hold two names for one tensor: accelerate drops the
    tied copy (SmolLM2's lm_head.weight is its embed_tokens.weight) and warns "Removed shared tensor {'lm_head.weight'}
    while saving ... check by verifying that you don't receive any warning while reloading". `load_state` restores the
    tie (safetensors' load_model fills a tied name from the tensor it shares), with no warning:
    tests/test_checkpoint.py checks both, so the notice is not left for the user to interpret."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNotice())


def _ckpt_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(accelerator, run_dir: Path, step: int, trainer_state: dict, hf_models: dict, tokenizer,
                    keep: int, optimizers: list = ()) -> Path:
    """Collective: every rank must call it (sharded states are gathered or written per rank).

    `optimizers` that have taken no step yet (the agent of a later phase) keep no state. Under FSDP2, torch's
    `get_optimizer_state_dict` (inside `save_state`) gives an empty AdamW a state by stepping it once with zero
    gradients and lr 0: the weights stay, but its step count becomes 1, so its first real step would be bias-corrected
    as a second one (0.744x as far with the default betas). Such optimizers are emptied again after the save, and
    `fresh_optimizers.json` names them so that `load_checkpoint` empties them after loading too."""
    root = _ckpt_root(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    fresh = [i for i, optimizer in enumerate(optimizers) if not optimizer.state]
    accelerator.save_state(str(tmp / "accelerate_state"))
    for i in fresh:
        optimizers[i].state.clear()
    for name, model in hf_models.items():
        state_dict = accelerator.get_state_dict(model)  # gathers full weights under FSDP2 (to the main process)
        accelerator.unwrap_model(model).save_pretrained(
            tmp / name, state_dict=state_dict, is_main_process=accelerator.is_main_process, save_function=accelerator.save
        )
    accelerator.wait_for_everyone()  # every rank's files (its RNG state, its shards) are written before the rename
    if accelerator.is_main_process:
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "accelerate_state" / "fresh_optimizers.json").write_text(json.dumps(fresh))
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump(trainer_state, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def update_trainer_state(accelerator, run_dir: Path, step: int, trainer_state: dict) -> None:
    """Rewrite the trainer state of the complete checkpoint of `step` in place, atomically (the weights are already
    there; re-saving the whole checkpoint would delete it for a moment)."""
    if accelerator.is_main_process:
        path = _ckpt_root(run_dir) / f"step_{step:06d}" / "trainer_state.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(trainer_state))
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def find_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (then its latest complete checkpoint)."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    latest = _ckpt_root(path) / "latest"
    if latest.is_file():
        ckpt = _ckpt_root(path) / latest.read_text().strip()
        if (ckpt / "trainer_state.json").is_file():
            return ckpt
    raise FileNotFoundError(f"--resume {path}: no checkpoint there (expected {path}/trainer_state.json or "
                            f"{latest} naming a complete checkpoint)")


def load_checkpoint(accelerator, ckpt: Path, optimizers: list = ()) -> dict:
    """Restore models, optimizers and RNG states in place; return the trainer state. The optimizers that had taken no
    step when the checkpoint was saved are left without state, as they were (see `save_checkpoint`)."""
    accelerator.load_state(str(ckpt / "accelerate_state"))
    fresh = ckpt / "accelerate_state" / "fresh_optimizers.json"
    for i in json.loads(fresh.read_text()) if fresh.is_file() else []:
        optimizers[i].state.clear()
    with open(ckpt / "trainer_state.json") as f:
        return json.load(f)


def check_shared(accelerator, run_dir: Path) -> None:
    """Collective. Every process writes its share of a checkpoint (its RNG state; under FSDP2 its shards) into the
    same directory, and the main process completes it: `run_dir` must be on storage that every node sees (a shared
    filesystem), as it is on one machine. Stops the run at its start, on every process, if a process cannot see
    what the main process wrote there."""
    marker = run_dir / f".shared_check_{os.environ.get('MASTER_PORT', '0')}"
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(run_dir.resolve()))
    accelerator.wait_for_everyone()
    seen = torch.tensor(float(marker.is_file()), device=accelerator.device)
    everyone = accelerator.reduce(seen, reduction="sum").item() == accelerator.num_processes
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink()
    if not everyone:
        raise SystemExit(f"{run_dir} is not shared by every process: its checkpoints need storage that every node sees "
                         "(a shared filesystem), since each process writes its part of them there; give --output_dir a "
                         "path on shared storage")


class Checkpointer:
    """A run's checkpoints, behind three calls: `resume` (load the latest and rewind the logs), `due` (is one owed
    now: every `every_steps` steps, every `every_minutes` minutes, or at a phase end) and `save`.

    `due` is collective: the minutes are measured on each process, so the processes agree on the answer (any
    process that is due makes all of them save). `save` of a step whose weights are already on disk rewrites only
    its trainer state (re-saving them would delete the checkpoint for a moment)."""

    def __init__(self, accelerator, run_dir: Path, agents: dict, tokenizer, keep: int, every_steps: int,
                 every_minutes: float):
        self.accelerator, self.run_dir, self.tokenizer, self.keep = accelerator, run_dir, tokenizer, keep
        self.every_steps, self.every_minutes = every_steps, every_minutes
        first = next(iter(agents.values()))
        # LoRA: one peft model holds every agent's adapter (saved as adapters/<agent>/); full: one model per agent
        self.hf_models = {"adapters": first.unwrapped} if first.adapter is not None else {n: a.model for n, a in agents.items()}
        self.optimizers = list({id(a.optimizer): a.optimizer for a in agents.values()}.values())  # (LoRA: one shared)
        self.saved_step: int | None = None
        self.last_save = time.time()
        check_shared(accelerator, run_dir)

    def resume(self, path: str | None, logger) -> dict | None:
        """The trainer state of the latest checkpoint of `path` (None: no --resume), with models, optimizers and every
        process's RNG restored; steps logged after it are dropped from the logs, to be run and logged again."""
        if path is None:
            return None
        ckpt = find_checkpoint(path)
        state = load_checkpoint(self.accelerator, ckpt, self.optimizers)
        logger.rewind(state["step"])
        self.saved_step = state["step"]
        if self.accelerator.is_main_process:
            print(f"resumed from {ckpt} at step {state['step']}")
        return state

    def due(self, step: int, phase_end: bool = False) -> bool:
        """Collective. Is a checkpoint owed after `step`?"""
        local = (self.every_steps > 0 and step % self.every_steps == 0) or phase_end or \
            (self.every_minutes > 0 and time.time() - self.last_save >= 60 * self.every_minutes)
        flag = torch.tensor(float(local), device=self.accelerator.device)
        return self.accelerator.reduce(flag, reduction="max").item() > 0

    def save(self, state: dict) -> None:
        """Collective. Save the run at state["step"] (models, optimizers, RNGs, the trainer state)."""
        if self.saved_step == state["step"]:
            update_trainer_state(self.accelerator, self.run_dir, state["step"], state)
        else:
            save_checkpoint(self.accelerator, self.run_dir, state["step"], state, self.hf_models, self.tokenizer,
                            self.keep, self.optimizers)
            self.saved_step = state["step"]
        self.last_save = time.time()
