"""The valid range of every numeric option, checked right after the command line is parsed, before anything heavy.

Each script states the ranges of its own numeric options in a dict `RANGES` (flag -> Range, the flag spelled as on
the command line without its dashes: "rollout_batch_size", "prompt_filter.eps_min"); the ranges of the option groups
the scripts share (utils/config.py, ArithmeticConfig) are stated once here, in SHARED, and a script's own entry for
a flag overrides them. `check_ranges(args, RANGES, prog)` walks every int / float option of the parsed `args`
(including `X | None` ones, where None is always legal, and those inside option groups) and refuses the first one
out of its range:

    rema_single.py: --rollout_batch_size 0: must be an integer >= 1

on stderr, with exit status 2 (a usage error, as for a flag tyro cannot parse) and no traceback. A float must also
be finite: NaN fails every comparison, so it is tested for explicitly, and so is inf.

`refuse(msg)` is the same exit for the scripts' cross-flag checks (divisibility by the number of processes, ...).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass

import tyro

from utils.config import (DataArgs, FilterArgs, GenerationArgs, GradingArgs, JudgeArgs, LoraArgs, OptimizerArgs,
                          RunArgs, VLLMArgs, VLLMEngineArgs)
from utils.data import ArithmeticConfig

SEED_MAX = 2**31 - 1  # numpy's seeds end at 2**32 - 1, and accelerate's set_seed adds the process index


class UsageError(SystemExit):
    """SystemExit with status 2; str() is the message (printed to stderr by `refuse` when raised)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def refuse(message: str) -> typing.NoReturn:
    """Print `message` to stderr and exit with status 2, without a traceback."""
    print(message, file=sys.stderr, flush=True)
    raise UsageError(message)


@dataclass(frozen=True)
class Range:
    """lo <= x <= hi (< with lo_open / hi_open); None: unbounded on that side. Floats must also be finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def admits(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and not (value > self.lo if self.lo_open else value >= self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self, kind: type) -> str:
        """'an integer >= 1', 'a finite number > 0', 'a number in [0, 1)', ..."""
        noun = "an integer" if kind is int else "a number" if self.lo is not None and self.hi is not None else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{noun} in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None:
            return f"{noun} {'<' if self.hi_open else '<='} {self.hi}"
        return noun


def at_least(lo) -> Range:
    return Range(lo=lo)


def above(lo) -> Range:
    return Range(lo=lo, lo_open=True)


def within(lo, hi, *, lo_open: bool = False, hi_open: bool = False) -> Range:
    return Range(lo, hi, lo_open, hi_open)


SEED = within(0, SEED_MAX)
PROBABILITY = within(0, 1)

# the option groups of utils/config.py (and ArithmeticConfig): group -> field -> range. Looked up along the group's
# MRO, so VLLMArgs has VLLMEngineArgs' ranges. A script's RANGES entry for the flag overrides these.
SHARED: dict[type, dict[str, Range]] = {
    RunArgs: {"seed": SEED, "eval_every": at_least(0), "transcripts_every": at_least(0), "num_transcripts": at_least(1),
              "save_every": at_least(0), "save_every_minutes": at_least(0), "keep_checkpoints": at_least(0),
              "max_minutes": above(0)},
    DataArgs: {"eval_limit": at_least(1)},
    GenerationArgs: {"top_p": within(0, 1, lo_open=True), "top_k": at_least(0), "generation_batch_size": at_least(1)},
    OptimizerArgs: {"learning_rate": above(0), "weight_decay": at_least(0), "adam_beta1": within(0, 1, hi_open=True),
                    "adam_beta2": within(0, 1, hi_open=True), "max_grad_norm": above(0), "max_skipped_steps": at_least(1)},
    LoraArgs: {"r": at_least(1), "alpha": at_least(1), "dropout": within(0, 1, hi_open=True)},
    VLLMEngineArgs: {"memory_utilization": within(0, 1, lo_open=True), "max_model_len": at_least(1)},
    VLLMArgs: {"importance_sampling_cap": at_least(1)},
    GradingArgs: {"timeout": above(0), "workers": at_least(1)},
    JudgeArgs: {"train_size": at_least(1), "test_size": at_least(1), "split_seed": at_least(0), "max_error": at_least(1)},
    FilterArgs: {"num_samples": at_least(1), "eps_min": PROBABILITY, "eps_max": PROBABILITY, "pool_size": at_least(1),
                 "plans_per_question": at_least(1)},
    ArithmeticConfig: {"max_operand": at_least(1), "num_operands": at_least(2), "train_size": at_least(1),
                       "test_size": at_least(1), "seed": at_least(0)},
}

# the options both training scripts have under the same name: each script's RANGES adds its own to these
TWIN_RANGES = {
    "switch_freq": at_least(1), "total_steps": at_least(1), "rollout_batch_size": at_least(1),
    "num_generations": at_least(1), "temperature": above(0), "epsilon": above(0), "epsilon_high": above(0),
    "dual_clip": above(1),  # it caps the loss of negative advantages at -A c
    "num_iterations": at_least(1), "mini_batch_size": at_least(1), "micro_batch_size": at_least(1),
}


def requirement(prog: str):
    """need(ok, msg): the scripts' cross-flag checks; refuse(f"{prog}: {msg}") unless ok."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            refuse(f"{prog}: {msg}")
    return need


def check_twin_options(args, need, world: int, estimators: dict, sequences: int, what: str) -> None:
    """The cross-flag checks both training scripts make: the batch splits over the processes, the estimator exists
    and has the group it needs, the worked example is a math one, and --mini_batch_size splits the `sequences`
    trained per step (`what`: how they are counted) into equal shares of every process."""
    B, G, mb = args.rollout_batch_size, args.num_generations, args.mini_batch_size
    need(B % world == 0, f"--rollout_batch_size {B} must be a multiple of the number of processes ({world})")
    need(args.advantage_estimator in estimators, f"--advantage_estimator must be one of {', '.join(estimators)}")
    need(not estimators[args.advantage_estimator].needs_group or G >= 2,
         f"--advantage_estimator {args.advantage_estimator} compares samples within a group: use --num_generations >= 2")
    need(not args.one_shot or args.data.task == "math", "--one_shot is a worked math example; the judge task has none")
    need(mb is None or (mb % world == 0 and sequences % mb == 0),
         f"--mini_batch_size {mb} must divide {what} ({sequences}) and be a multiple of the number of processes")


@dataclass(frozen=True)
class NumericOption:
    path: tuple[str, ...]  # attributes from the parsed Args to the value: ("prompt_filter", "eps_min")
    flag: str  # as on the command line, without "--": "prompt_filter.eps_min" (a flat group adds no prefix)
    kind: type  # int or float
    optional: bool  # `X | None`: None is legal
    group: type  # the dataclass that declares the field

    def get(self, args):
        for name in self.path:
            args = getattr(args, name)
        return args


def _numeric(hint) -> tuple[type, bool] | None:
    """(int or float, optional) for int, float, `int | None`, `float | None`; else None."""
    if hint in (int, float):
        return hint, False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(kinds) == 1 and kinds[0] in (int, float) and len(typing.get_args(hint)) == 2:
            return kinds[0], True
    return None


def numeric_options(args_type: type, _path: tuple[str, ...] = (), _prefix: str = "") -> list[NumericOption]:
    """Every int / float option of the dataclass `args_type`, nested option groups included, with its CLI flag: a
    group annotated with tyro.conf.OmitArgPrefixes (utils.config.Flat) adds no prefix, any other adds its name."""
    hints = typing.get_type_hints(args_type, include_extras=True)
    found = []
    for f in dataclasses.fields(args_type):
        hint, flat = hints[f.name], False
        if typing.get_origin(hint) is typing.Annotated:
            hint, *meta = typing.get_args(hint)
            flat = any(m is tyro.conf.OmitArgPrefixes for m in meta)
        if dataclasses.is_dataclass(hint):
            found += numeric_options(hint, _path + (f.name,), _prefix if flat else f"{_prefix}{f.name}.")
        elif (numeric := _numeric(hint)) is not None:
            found.append(NumericOption(_path + (f.name,), _prefix + f.name, numeric[0], numeric[1], args_type))
    return found


def range_of(option: NumericOption, ranges: dict[str, Range]) -> Range | None:
    """The script's range for the flag, else the shared one of its group; None if neither states one."""
    if option.flag in ranges:
        return ranges[option.flag]
    for group in option.group.__mro__:
        if option.path[-1] in SHARED.get(group, {}):
            return SHARED[group][option.path[-1]]
    return None


def check_ranges(args, ranges: dict[str, Range], prog: str):
    """Refuse (stderr, exit status 2) the first numeric option of `args` outside its range; returns `args`."""
    for option in numeric_options(type(args)):
        value, valid = option.get(args), range_of(option, ranges)
        if valid is None or (value is None and option.optional):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid.admits(value):
            refuse(f"{prog}: --{option.flag} {value}: must be {valid.describe(option.kind)}"
                   + (", or None" if option.optional else ""))
    return args
