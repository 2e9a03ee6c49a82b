"""What a long run must survive without losing work: a non-finite gradient and a scheduler's SIGTERM.

- `NonFiniteGuard`: an optimizer step whose gradient norm is NaN or inf (a non-finite loss makes a non-finite
  gradient) is skipped, counted and reported, never applied; after `max_in_a_row` such steps in a row the run stops
  with a message, its last checkpoint intact. The gradient norm is all-reduced by `clip_grad_norm_`, so every
  process takes the same decision.
- `Preemption`: SIGTERM (a cluster reclaiming the machine) only sets a flag. Generation (rollout, prompt filtering,
  evaluation) looks at it between batches and stops; `check()` (collective: every process asks at the same point,
  and all of them raise `Preempted` if any was signalled) then unwinds the step. Nothing has changed the weights
  at that point, so the script saves a checkpoint of the last completed step and exits with status 0; `--resume`
  redoes the interrupted work exactly (every sample is seeded by its key). The update is not interrupted: it
  finishes (it takes seconds at the CPU defaults), then the step ends, is logged and checkpointed.
"""

import math
import signal

import torch


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int, script: str):
        self.max_in_a_row = max_in_a_row
        self.script = script
        self.skipped = 0  # over the run (logged as train/skipped_steps)
        self.in_a_row = 0

    def step_ok(self, grad_norm: float, step: int, verbose: bool) -> bool:
        """True if the optimizer step may be applied; False (and counted) if the gradient is not finite. Raises
        SystemExit after max_in_a_row non-finite steps in a row."""
        if math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if verbose:
            print(f"{self.script}: step {step}: gradient norm {grad_norm}; optimizer step skipped "
                  f"({self.in_a_row} in a row, {self.skipped} in the run)", flush=True)
        if self.in_a_row >= self.max_in_a_row:
            raise SystemExit(f"{self.script}: {self.in_a_row} optimizer steps in a row had a non-finite loss or "
                             "gradient, so the run stopped without applying them; its last checkpoint holds the last "
                             "good state. Lower --learning_rate or --max_grad_norm, or check the model and the data, "
                             "then --resume the run directory.")
        return False


class Preempted(Exception):
    """Raised on every process at once when any process received SIGTERM (`Preemption.check`)."""


class Preemption:
    def __init__(self):
        self.signalled = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def local(self) -> bool:
        """Was this process sent SIGTERM? (No communication: safe to ask anywhere.)"""
        return self.signalled

    def requested(self, accelerator) -> bool:
        """Collective (every process must call it at the same point): was any process sent SIGTERM?"""
        flag = torch.tensor(float(self.signalled), device=accelerator.device)
        return accelerator.reduce(flag, reduction="max").item() > 0

    def check(self, accelerator) -> None:
        """Collective: raise `Preempted` on every process if any process was sent SIGTERM."""
        if self.requested(accelerator):
            raise Preempted
