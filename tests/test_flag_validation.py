"""Every numeric option of every script is checked against its range right after parsing, before a model loads: a
bad value exits with status 2 and a message that names the flag and its valid range, without a traceback.

The sweep finds the numeric options itself (utils.validate.numeric_options over each script's Args, cross-checked
against tyro's own parser), so a new numeric flag is swept too; one without a declared range fails
test_every_numeric_flag_has_a_range unless UNCHECKED says why. Each flag gets 0 and -1 (ints) or 0, -1, nan and inf
(floats) through the script's own parse_args (in-process, no accelerator, no model) and, for the training scripts,
its validate() for one process. A value that is accepted must be in LEGAL with the reason it is legal; a value in
LEGAL that is refused fails too, so the table cannot rot."""

import argparse
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tyro

import eval as ev
import rema_multiturn as mt
import rema_single as rs
import sft
from utils.validate import Range, UsageError, check_ranges, numeric_options, range_of, refuse

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"rema_single.py": rs, "rema_multiturn.py": mt, "sft.py": sft, "eval.py": ev}

# numeric flags deliberately left without a range: flag -> why (none today)
UNCHECKED: dict[str, dict[str, str]] = {name: {} for name in SCRIPTS}

# (flag, value) accepted by every script that has the flag, with the reason it is legal
LEGAL = {
    ("eval_every", "0"): "0: evaluate at the start and the end only (RunArgs docstring)",
    ("transcripts_every", "0"): "0: never write transcripts (RunArgs docstring)",
    ("save_every", "0"): "0: no checkpoint by step count (RunArgs docstring)",
    ("save_every_minutes", "0"): "0: no checkpoint by time (RunArgs docstring)",
    ("keep_checkpoints", "0"): "0 deletes no checkpoint, keeps them all (utils/checkpoint.py: complete[:-keep] if keep > 0)",
    ("seed", "0"): "any seed in [0, 2**31 - 1]; accelerate's set_seed adds the process index, numpy takes < 2**32",
    ("arithmetic.seed", "0"): "the seed of the train/test draw: any integer >= 0",
    ("judge.split_seed", "0"): "the seed of the RewardBench split draw: any integer >= 0",
    ("top_k", "0"): "0 disables top-k (GenerationArgs docstring)",
    ("beta", "0"): "0: no KL term, no reference model loaded (rema_single.py docstring)",
    ("weight_decay", "0"): "AdamW without weight decay (the paper's single-turn setting)",
    ("adam_beta1", "0"): "torch's AdamW takes 0 <= beta < 1; beta1 = 0 is Adam without momentum",
    ("adam_beta2", "0"): "torch's AdamW takes 0 <= beta < 1; beta2 = 0 normalises by the latest squared gradient",
    ("lora.dropout", "0"): "no LoRA dropout (the default)",
    ("prompt_filter.eps_min", "0"): "succ(x) >= 0 keeps every question from below (docs/ablations.md runs it)",
}
# (flag, value) accepted by one script only
LEGAL_IN = {
    "eval.py": {("arithmetic.train_size", "0"): "evaluation reads the arithmetic test split, drawn before the train "
                                                "split, so the train size does not change it"},
}


def legal(script: str, flag: str, value: str) -> str | None:
    return LEGAL_IN.get(script, {}).get((flag, value)) or LEGAL.get((flag, value))


class OneProcess:
    num_processes, distributed_type = 1, "NO"


class TwoProcesses:
    num_processes, distributed_type = 2, "MULTI_GPU"


def run_cli(script: str, argv: list[str], monkeypatch, capsys) -> tuple[object, str]:
    """The script's parsing and range check, then (training scripts) its validate() for one process, in-process.
    Returns (exit code or None if accepted, stderr)."""
    module = SCRIPTS[script]
    monkeypatch.setattr(sys, "argv", [script, *argv])
    capsys.readouterr()
    try:
        args = module.parse_args()
        if hasattr(module, "validate"):
            module.validate(args, OneProcess())
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr().err
    return None, capsys.readouterr().err


def sweep_values(kind: type) -> list[str]:
    return ["0", "-1"] if kind is int else ["0", "-1.0", "nan", "inf"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_has_a_range(script):
    module = SCRIPTS[script]
    options = numeric_options(module.Args)
    assert options, f"{script}: no numeric option found: the introspection is broken"
    missing = [o.flag for o in options if range_of(o, module.RANGES) is None and o.flag not in UNCHECKED[script]]
    assert not missing, (f"{script}: numeric flags without a range: {missing}; state one in the script's RANGES (or "
                         "utils/validate.py SHARED), or list the flag in UNCHECKED with the reason")
    assert set(module.RANGES) <= {o.flag for o in options}, f"{script}: RANGES names flags the script does not have"
    assert all(reason for reason in UNCHECKED[script].values())


def tyro_numeric_flags(args_type) -> set[str]:
    """The flags tyro's own parser reads as INT / FLOAT (with or without {None}), spelled with underscores."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_parser = getattr(tyro.extras, "get_parser", None)
        if get_parser is None:
            pytest.skip("this tyro has no extras.get_parser to cross-check against")
        parser = get_parser(args_type)

    def actions(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from actions(sub)
            else:
                yield a

    flags = set()
    for a in actions(parser):
        if any(word in str(a.metavar) for word in ("INT", "FLOAT")):
            long = [s for s in a.option_strings if s.startswith("--")][0]
            flags.add(long[2:].replace("-", "_"))
    return flags


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_sweep_sees_every_numeric_flag_tyro_parses(script):
    """numeric_options finds the flags the command line has: the same set, spelled as the user types them."""
    module = SCRIPTS[script]
    assert {o.flag for o in numeric_options(module.Args)} == tyro_numeric_flags(module.Args)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_refuses_zero_negative_and_nan_by_name(script, monkeypatch, capsys):
    problems, swept = [], set()
    for option in numeric_options(SCRIPTS[script].Args):
        for value in sweep_values(option.kind):
            swept.add((option.flag, value))
            code, err = run_cli(script, [f"--{option.flag}", value], monkeypatch, capsys)
            reason = legal(script, option.flag, value)
            if reason:
                if code is not None:
                    problems.append(f"--{option.flag} {value} is legal ({reason}) but exited {code!r}: {err.strip()}")
            elif code is None:
                problems.append(f"--{option.flag} {value} was accepted, and LEGAL gives no reason why")
            elif code != 2 or f"--{option.flag} " not in err or "Traceback" in err:
                problems.append(f"--{option.flag} {value}: exit {code!r}, stderr {err.strip()!r}")
    assert not problems, f"{script}:\n" + "\n".join(problems)
    stale = [key for key in LEGAL_IN.get(script, {}) if key not in swept]
    assert not stale, f"{script}: LEGAL_IN entries for cases the sweep does not run: {stale}"


def test_every_legal_entry_is_swept_somewhere():
    swept = {(o.flag, v) for m in SCRIPTS.values() for o in numeric_options(m.Args) for v in sweep_values(o.kind)}
    assert set(LEGAL) <= swept, f"LEGAL entries no script sweeps: {set(LEGAL) - swept}"


def test_the_message_names_the_flag_and_the_range(monkeypatch, capsys):
    assert run_cli("rema_single.py", ["--rollout_batch_size", "0"], monkeypatch, capsys) == (
        2, "rema_single.py: --rollout_batch_size 0: must be an integer >= 1\n")
    assert run_cli("rema_single.py", ["--prompt_filter.eps_min", "nan"], monkeypatch, capsys) == (
        2, "rema_single.py: --prompt_filter.eps_min nan: must be a number in [0, 1]\n")
    assert run_cli("rema_multiturn.py", ["--max_completion_length", "0"], monkeypatch, capsys) == (
        2, "rema_multiturn.py: --max_completion_length 0: must be an integer >= 1\n")
    code, err = run_cli("rema_single.py", ["--mini_batch_size", "0"], monkeypatch, capsys)
    assert (code, err) == (2, "rema_single.py: --mini_batch_size 0: must be an integer >= 1, or None\n")
    code, err = run_cli("eval.py", ["--vllm.memory_utilization", "1.5"], monkeypatch, capsys)
    assert (code, err) == (2, "eval.py: --vllm.memory_utilization 1.5: must be a number in (0, 1], or None\n")
    code, err = run_cli("sft.py", ["--learning_rate", "-1e-5"], monkeypatch, capsys)
    assert (code, err) == (2, "sft.py: --learning_rate -1e-05: must be a finite number > 0\n")
    code, err = run_cli("rema_single.py", ["--seed", str(2**32)], monkeypatch, capsys)  # numpy's seeds end there
    assert code == 2 and "--seed 4294967296: must be an integer in [0, 2147483647]" in err
    # None is legal where the type says so, and the upper end of a closed range is in it
    assert run_cli("rema_single.py", ["--mini_batch_size", "None", "--vllm.memory_utilization", "1"], monkeypatch,
                   capsys)[0] is None


def test_defaults_and_presets_are_in_range():
    for script, module in SCRIPTS.items():
        check_ranges(module.Args(), module.RANGES, script)  # (the presets: tests/test_presets.py, through validate)


def test_cross_flag_checks_exit_2_with_their_message(capsys):
    with pytest.raises(SystemExit, match="multiple of the number of processes") as refused:
        rs.validate(rs.Args(rollout_batch_size=3), TwoProcesses())
    assert refused.value.code == 2 and "--rollout_batch_size 3 must be a multiple" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--mini_batch_size 5 must divide") as refused:
        rs.validate(rs.Args(mini_batch_size=5), OneProcess())
    assert refused.value.code == 2
    with pytest.raises(SystemExit, match="--mini_batch_size 5 must divide") as refused:
        mt.validate(mt.Args(mini_batch_size=5), OneProcess())
    assert refused.value.code == 2 and "--mini_batch_size 5" in capsys.readouterr().err


def test_usage_error():
    with pytest.raises(UsageError) as refused:
        refuse("x.py: --n 0: must be an integer >= 1")
    assert refused.value.code == 2 and str(refused.value) == "x.py: --n 0: must be an integer >= 1"
    r = Range(lo=0, hi=1, hi_open=True)
    assert r.admits(0.0) and not r.admits(1.0) and not r.admits(math.nan) and not r.admits(-0.5)
    assert not Range(lo=0).admits(math.inf) and Range(lo=0).admits(10**30)


@pytest.mark.parametrize("script,argv,flag", [
    ("rema_single.py", ["--rollout_batch_size", "0"], "--rollout_batch_size"),  # was a ZeroDivisionError
    ("eval.py", ["--temperature", "nan", "--num_samples", "4"], "--temperature"),
])
def test_the_real_command_line_refuses_before_loading_anything(script, argv, flag, tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv, "--output_dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert flag in proc.stderr and "must be" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not any(tmp_path.iterdir())  # nothing was written: the run never started
