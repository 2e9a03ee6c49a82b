"""Named presets (`--preset NAME`): every one builds a configuration that passes the scripts' own validation for an
8-process launch, the paper's values land in the right options, and flags given with a preset override it."""

import sys

import pytest

import rema_multiturn as mt
import rema_single as rs
from utils.config import cli, with_overrides
from utils.presets import multi_turn, single_turn


class EightProcesses:
    num_processes, distributed_type = 8, "MULTI_GPU"


@pytest.mark.parametrize("script,presets", [(rs, single_turn()), (mt, multi_turn())], ids=["single", "multi"])
def test_every_preset_is_a_valid_configuration(script, presets):
    assert "cpu" in presets and overrides_of(presets, "cpu") == {}  # the defaults are the CPU preset
    for name, (description, overrides) in presets.items():
        args = with_overrides(script.Args(), overrides)
        script.validate(args, EightProcesses())
        assert description


def overrides_of(presets, name):
    return presets[name][1]


def test_paper_single_turn_values():
    """Sec. 3.2.1 / App. D.1, Qwen2.5-7B on MATH: 10 rounds of 4 epochs, REINFORCE++ with KL 1e-2, lr 5e-7, 1000 x 4."""
    args = with_overrides(rs.Args(), overrides_of(single_turn(), "paper-qwen2.5-7b"))
    assert (args.mode, args.num_update_iterations, args.num_train_epochs) == ("rema", 10, 4)
    assert (args.advantage_estimator, args.beta, args.optim.learning_rate) == ("reinforce_pp", 0.01, 5e-7)
    assert (args.rollout_batch_size, args.num_generations, args.reas_samples_per_plan) == (1000, 4, None)
    assert (args.meta_max_completion_length, args.reas_max_completion_length, args.epsilon) == (2048, 2048, 0.2)
    assert (args.temperature, args.one_shot) == (1.0, False)  # the paper's sampling and prompts, not the cpu preset's
    f = args.prompt_filter
    assert (f.num_samples, f.eps_min, f.eps_max, f.pool_size, f.plans_per_question) == (10, 0.2, 0.8, None, 4)
    assert args.lm.model == "Qwen/Qwen2.5-7B-Instruct" and (args.data.train_dataset, args.data.train_split) == ("hendrycks_math", "train")
    vrp = with_overrides(rs.Args(), overrides_of(single_turn(), "paper-llama3-8b-vrp"))
    assert (vrp.mode, vrp.num_train_epochs, vrp.optim.learning_rate) == ("vrp", 12, 2e-7)
    judge = with_overrides(rs.Args(), overrides_of(single_turn(), "paper-judge-qwen2.5-7b"))
    assert (judge.data.task, judge.num_update_iterations, judge.num_train_epochs) == ("judge", 1, 1)
    assert (judge.prompt_filter.eps_min, judge.prompt_filter.eps_max) == (0.1, 0.9)


def test_paper_multi_turn_values():
    """App. D.2: 128 questions x 16 trajectories, 30 turns of 512 tokens, 4096 context, mask and stop on truncation."""
    args = with_overrides(mt.Args(), overrides_of(multi_turn(), "paper-qwen2.5-7b"))
    assert (args.rollout_batch_size, args.num_generations, args.max_turns) == (128, 16, 30)
    assert (args.max_completion_length, args.max_context_length, args.temperature) == (512, 4096, 1.0)
    assert args.mask_unfinished_reward and args.stop_when_truncated
    assert mt.update_sizes(128 * 16 * 2, args, 8) == (128, 4)  # 4 optimizer steps per rollout, on 8 processes
    assert (args.optim.learning_rate, args.optim.weight_decay, args.total_steps) == (1e-6, 0.01, 500)
    assert not args.one_shot  # the paper's prompts: its model learned the protocol by SFT (sft.py)


def test_flags_override_a_preset(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rema_single.py", "--preset", "paper-qwen2.5-7b", "--total_steps", "5",
                                      "--learning_rate", "1e-6", "--prompt_filter.num_samples", "3"])
    args = cli(rs.Args, single_turn(), "rema_single.py")
    assert args.preset == "paper-qwen2.5-7b" and args.rollout_batch_size == 1000  # from the preset
    assert (args.total_steps, args.optim.learning_rate, args.prompt_filter.num_samples) == (5, 1e-6, 3)  # flags win
    assert args.prompt_filter.pool_size is None  # the rest of the group keeps the preset's values
    monkeypatch.setattr(sys, "argv", ["rema_single.py", "--preset", "paper-gpt5"])
    with pytest.raises(SystemExit, match="unknown --preset 'paper-gpt5'"):
        cli(rs.Args, single_turn(), "rema_single.py")


def test_cpu_sizes_on_a_large_model_say_so(capsys):
    import torch

    big = torch.nn.Linear(1, 1)
    big.weight = torch.nn.Parameter(torch.empty(0))  # parameters are only counted: a meta-sized stand-in
    big.extra = torch.nn.Parameter(torch.empty(2_000_000_000, device="meta"))
    from utils.config import warn_if_scales_mix

    warn_if_scales_mix(rs.Args(), big, 1, "rema_single.py")
    assert "WARNING: --preset cpu" in capsys.readouterr().out
    warn_if_scales_mix(rs.Args(preset="paper-qwen2.5-7b"), big, 8, "rema_single.py")
    warn_if_scales_mix(rs.Args(), torch.nn.Linear(4, 4), 1, "rema_single.py")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("cuda,cuda_bf16,cpu_bf16,expected", [
    (True, True, False, True),     # a GPU with bf16 (Ampere and later)
    (True, False, True, False),    # a GPU without it: the CPU's answer does not matter
    (False, False, True, True),    # a CPU with AVX-512 / AMX
    (False, False, False, False),  # an AVX2-only CPU: emulated bf16, 4x slower than float32
])
def test_bf16_defaults_to_on_only_where_the_hardware_computes_it(monkeypatch, cuda, cuda_bf16, cpu_bf16, expected):
    import torch

    from utils.config import fast_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda_bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: cpu_bf16)
    assert fast_bf16() is expected
    assert rs.Args().lm.bf16 is expected and mt.Args().lm.bf16 is expected  # every script's default asks it


@pytest.mark.parametrize("argv,filtered,one_shot", [
    ([], True, True),  # the cpu preset: ReMA, filtered, with the worked example
    (["--mode", "vrp"], False, True),  # the baselines train on the whole set unless asked (App. D.1 is ReMA's)
    (["--mode", "mrp", "--filter"], True, True),  # ... and --filter keeps the filter as an ablation
    (["--mode=vrp", "--filter"], True, True),
    (["--no-filter"], False, True),
    (["--task", "judge"], True, False),  # the example is a sum: not on the judge task
    (["--no-one_shot"], True, False),
    (["--preset", "paper-qwen2.5-7b"], True, False),  # the paper's prompts
    (["--preset", "paper-qwen2.5-7b", "--mode", "vrp"], False, False),
    (["--preset", "paper-qwen2.5-7b-vrp", "--filter"], True, False),
])
def test_options_that_follow_others_unless_given(monkeypatch, argv, filtered, one_shot):
    monkeypatch.setattr(sys, "argv", ["rema_single.py", *argv])
    args = rs.parse_args()
    assert (args.filter, args.one_shot) == (filtered, one_shot)


def test_one_shot_prompts_put_the_example_before_the_question():
    from utils import prompts

    for build in (lambda q, s: prompts.reas_messages(q, "plan", s), lambda q, s: prompts.vrp_messages(q, s),
                  lambda q, s: prompts.mrp_messages(q, s)):
        plain, shot = build("What is 2 + 3?", False), build("What is 2 + 3?", True)
        assert [m["role"] for m in plain] == ["system", "user"]
        assert [m["role"] for m in shot] == ["system", "user", "assistant", "user"]
        assert shot[0] == plain[0] and shot[-1] == plain[-1]  # the paper's system prompt and question, unchanged
        assert prompts.ONE_SHOT["question"] in shot[1]["content"] and "2 + 3" not in shot[1]["content"]
        assert shot[2]["content"].endswith("\\boxed{12}.")  # the example shows the boxed answer
    # the meta-thinking agent keeps the paper's prompt: how to plan is left to RL
    assert [m["role"] for m in prompts.meta_messages("What is 2 + 3?")] == ["system", "user"]


@pytest.mark.parametrize("argv,one_shot", [([], True), (["--no-one_shot"], False), (["--task", "judge"], False),
                                           (["--preset", "paper-qwen2.5-7b"], False),
                                           (["--preset", "paper-qwen2.5-7b", "--one_shot"], True)])
def test_multi_turn_one_shot_follows_the_preset_and_task(monkeypatch, argv, one_shot):
    monkeypatch.setattr(sys, "argv", ["rema_multiturn.py", *argv])
    assert mt.parse_args().one_shot == one_shot


def test_multi_turn_one_shot_shows_each_agent_one_exchange():
    """The MTA's example instruction ends with [FINISH] (the protocol the paper's model learns by SFT); the RA's
    example answers that instruction with a box. The system prompts and the question are the paper's."""
    from utils import prompts

    meta, meta_shot = prompts.multiturn_meta_messages("What is 2 + 3?"), prompts.multiturn_meta_messages("What is 2 + 3?", True)
    assert [m["role"] for m in meta_shot] == ["system", "user", "assistant", "user"]
    assert meta_shot[0] == meta[0] and meta_shot[-1] == meta[-1]
    assert meta_shot[1]["content"] == prompts.ONE_SHOT["question"] and meta_shot[2]["content"].endswith(prompts.FINISH_FLAG)
    reas, reas_shot = (prompts.multiturn_reas_messages("What is 2 + 3?", "Add them.", one_shot=s) for s in (False, True))
    assert [m["role"] for m in reas_shot] == ["system", "user", "assistant", "user"]
    assert reas_shot[0] == reas[0] and reas_shot[-1] == reas[-1]
    assert prompts.ONE_SHOT["plan"] in reas_shot[1]["content"] and reas_shot[2]["content"].endswith("\\boxed{12}.")
