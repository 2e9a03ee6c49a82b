"""The default commands must give the agents something to learn from. With the real embedded model
(SmolLM2-135M-Instruct from PyPI) and the `cpu` preset exactly as `rema_single.py` parses it, the RA's first
rollout on a few training questions (each under the MTA's greedy plan, as D_l's filter builds them) must have
rewards that differ within a group: with the paper's zero-shot prompts the 135M model never boxes an answer, every
reward is -1, every advantage 0, and the first phase trains on nothing."""

import sys

import pytest
import torch

from utils import prompts
from accelerate import Accelerator

import rema_single as rs
from utils.faults import Preemption
from utils.grading import Grader
from utils.models import Agent, load_model, load_tokenizer, resolve_model
from utils.sampling import make_sampler
from utils.task import TASKS


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "float32"])
def test_cpu_preset_first_reasoning_rollout_has_reward_variance(monkeypatch, bf16):
    monkeypatch.setattr(sys, "argv", ["rema_single.py", "--bf16" if bf16 else "--no-bf16"])
    args = rs.parse_args()  # the default command's configuration
    accelerator = Accelerator(cpu=True)
    path = resolve_model(args.lm.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    agents = {name: Agent(name, model, None, [], length, unwrapped=model) for name, length in
              (("meta_thinking", args.meta_max_completion_length), ("reasoning", args.reas_max_completion_length))}
    grader = Grader(args.grading.timeout, 1, args.grading.grader)
    try:
        task = TASKS[args.data.task](tokenizer, grader, args.one_shot)
        train_set, _ = task.load(args)
        sampler = make_sampler(args, accelerator, path, tokenizer, Preemption(), max_model_len=None)
        items = [q | {"uid": i} for i, q in enumerate(train_set[:4])]
        with torch.no_grad():
            _, plans = sampler(agents["meta_thinking"], [task.meta_prompt(q) for q in items], 0.0, "greedy plans")
            rollout = rs.rollout_reasoning([q | {"plan": m} for q, m in zip(items, plans)], agents["reasoning"], agents,
                                           sampler, task, args, step=0)
    finally:
        grader.close()
    rewards = torch.tensor(rollout["rewards"]).view(len(items), args.num_generations)  # (questions, G)
    assert (rewards.std(-1) > 0).any(), f"every group's rewards are equal: {rewards.tolist()}"
    assert (rewards > -1).float().mean() >= 0.25, f"few answers are boxed: {rewards.tolist()}"


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "float32"])
def test_multi_turn_cpu_preset_first_rollout_has_finished_conversations_and_reward_variance(monkeypatch, bf16):
    """rema_multiturn.py's default keeps the paper's reward mask (0 unless the MTA wrote [FINISH]): its first rollout
    must have conversations the MTA finished and groups whose rewards differ. Without the MTA's example exchange
    (--no-one_shot) the untrained model never writes [FINISH] and every reward is 0. The RA has no example, so most of
    its first answers run past 32 tokens and few conversations end normally: on the first 8 questions no group had
    differing rewards (bf16 and float32, measured), on the first 16 (two steps' worth) one or two did."""
    import rema_multiturn as mt

    monkeypatch.setattr(sys, "argv", ["rema_multiturn.py", "--bf16" if bf16 else "--no-bf16"])
    args = mt.parse_args()
    assert args.mask_unfinished_reward and args.one_shot  # the default command's configuration
    accelerator = Accelerator(cpu=True)
    path = resolve_model(args.lm.model)
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    policy = Agent("policy", model, None, [], args.max_completion_length, unwrapped=model)
    grader = Grader(args.grading.timeout, 1, args.grading.grader)
    try:
        task = TASKS[args.data.task](tokenizer, grader, args.one_shot)
        train_set, _ = task.load(args)
        sampler = make_sampler(args, accelerator, path, tokenizer, Preemption(), max_model_len=None,
                               stop_strings=("[FINISH]",))
        G = args.num_generations
        items = [q | {"key": (0, i, g)} for i, q in enumerate(train_set[:16]) for g in range(G)]
        with torch.no_grad():
            trajs = mt.rollout(items, {role: policy for role in mt.ROLES}, sampler, task, args, args.temperature, "rollout")
    finally:
        grader.close()
    # the MTA's example teaches it to write [FINISH]; the RA, without one, must still end some conversations normally
    finished = [prompts.FINISH_FLAG in tr.turns[0].text for tr in trajs]
    normal = [tr.reason == mt.NORMAL for tr in trajs]
    rewards = torch.tensor([tr.reward for tr in trajs]).view(-1, G)  # (questions, G)
    assert sum(finished) >= len(trajs) // 4, f"the MTA finished {sum(finished)} of {len(trajs)} conversations"
    assert sum(normal) > 0, "no conversation ended normally"
    assert (rewards.std(-1) > 0).any(), f"every group's rewards are equal: {rewards.tolist()}"
