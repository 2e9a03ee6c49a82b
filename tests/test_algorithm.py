"""The algorithm's pure functions against values computed by hand (the arithmetic is written out in comments)."""

import math

import pytest
import torch

import rema_single as rs
from utils.config import ModelArgs
from utils.batch import collate, select
from utils.distributed import shard
from utils.generation import Completion


class OneProcess:
    """Stands in for the Accelerator in single-process tests: a reduction over one process is the identity."""

    def reduce(self, tensor, reduction="sum"):
        return tensor


# ---- rewards (App. C.2, E.1) ----
def test_reas_reward_format_aware():
    assert rs.reas_reward(1.0, "so \\boxed{7}") == 1.0
    assert rs.reas_reward(1.0, "the answer is 7") == 1.0  # correctness does not need the box (math-verify)
    assert rs.reas_reward(0.0, "so \\boxed{8}") == -0.5  # wrong, but in the answer format
    assert rs.reas_reward(0.0, "so it is 8") == -1.0  # no boxed answer


def test_meta_reward_accuracy_and_leak_penalty():
    # mean of [1, 0, 1, 1] = 0.75
    assert rs.meta_reward("add the numbers", ["a"] * 4, [1.0, 0.0, 1.0, 1.0], "accuracy") == 0.75
    # the plan states a boxed answer: 0.75 - 1
    assert rs.meta_reward("it is \\boxed{7}", ["a"] * 4, [1.0, 0.0, 1.0, 1.0], "accuracy") == -0.25


def test_meta_reward_consistency():
    sols = ["\\boxed{4}", "\\boxed{ 4 }", "\\boxed{5}", "no answer"]
    # 3 of 4 give an answer (not a minority); the most common, 4, appears twice: 2 / 4
    assert rs.meta_reward("plan", sols, [0.0] * 4, "consistency") == 0.5
    # only 1 of 4 answers: most responses give no definitive answer -> 0
    assert rs.meta_reward("plan", ["\\boxed{4}", "a", "b", "c"], [0.0] * 4, "consistency") == 0.0
    # all agree, but the plan leaks a boxed answer: 1 - 1
    assert rs.meta_reward("\\boxed{4}", ["\\boxed{4}"] * 4, [0.0] * 4, "consistency") == 0.0


# ---- advantages ----
def test_grpo_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    ones = torch.ones(8, 1)  # one token per sequence: the advantage per sequence
    adv = rs.grpo_advantages(rewards, ones, None, None, 4, rs.Args(scale_rewards=True), OneProcess())[:, 0]
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    expected = [0.75 / (0.5 + 1e-4)] + [-0.25 / (0.5 + 1e-4)] * 3 + [0.0] * 4  # group 2: all equal -> 0
    assert adv.tolist() == pytest.approx(expected)
    unscaled = rs.grpo_advantages(rewards, ones, None, None, 4, rs.Args(scale_rewards=False), OneProcess())[:, 0]
    assert unscaled.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_rloo_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, -1.0])
    adv = rs.rloo_advantages(rewards, torch.ones(4, 1), None, None, 4, rs.Args(), OneProcess())[:, 0]
    # A_i = R_i - mean of the other three: 1 - (-1/3), 0 - 0, 0 - 0, -1 - 1/3
    assert adv.tolist() == pytest.approx([4 / 3, 0.0, 0.0, -4 / 3])


def test_reinforce_pp_without_kl_whitens_outcome_returns():
    rewards = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = rs.reinforce_pp_advantages(rewards, mask, None, None, 1, rs.Args(beta=0.0), OneProcess())
    # returns (gamma = 1): [1, 1, -] and [-1, -1, -1]; over the 5 tokens mean -0.2, std sqrt(1 - 0.04)
    std = math.sqrt(0.96)
    expected = [[1.2 / std, 1.2 / std, 0.0], [-0.8 / std] * 3]
    assert adv.tolist() == [pytest.approx(row, rel=1e-5) for row in expected]


def test_reinforce_pp_kl_in_reward():
    rewards = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    adv = rs.reinforce_pp_advantages(rewards, mask, old, ref, 1, rs.Args(beta=0.1), OneProcess())
    # k1 KL of seq 1 = [0.5, 0, -]: token rewards [-0.05, 1] -> returns [0.95, 1.0]; seq 2 returns [-1, -1, -1]
    values = [0.95, 1.0, -1.0, -1.0, -1.0]
    mean = sum(values) / 5  # -0.21
    std = math.sqrt(sum(v * v for v in values) / 5 - mean**2)  # sqrt(0.9805 - 0.0441)
    expected = [[(0.95 - mean) / std, (1.0 - mean) / std, 0.0], [(-1.0 - mean) / std] * 3]
    assert adv.tolist() == [pytest.approx(row, rel=1e-5) for row in expected]


def test_reinforce_pp_whitening_does_not_inflate_kl_noise_when_outcomes_tie():
    """OpenRLHF's whitening, (x - mean) / sqrt(max(var, 1e-8)): both rewards 1, beta 0.01, one token 0.005 nats off
    the reference. Returns [1 - 5e-5, 1] and [1, 1]: mean 1 - 1.25e-5, var 4.6875e-10 < 1e-8, so the deviations are
    divided by 1e-4 (std + 1e-8 would divide by 2.2e-5 and give unit-variance advantages from the KL alone)."""
    rewards = torch.tensor([1.0, 1.0])
    mask = torch.ones(2, 2)
    old = torch.zeros(2, 2)
    ref = torch.tensor([[-0.005, 0.0], [0.0, 0.0]])
    adv = rs.reinforce_pp_advantages(rewards, mask, old, ref, 1, rs.Args(beta=0.01), OneProcess())
    assert adv.tolist() == [pytest.approx(row, rel=1e-2) for row in [[-0.375, 0.125], [0.125, 0.125]]]


def test_paper_baseline_presets_train_unfiltered_and_rema_filtered():
    """App. D.1 describes the prompt filter for ReMA's agents; the VRP_RL / MRP_RL baselines' #TrainingEpisode is
    epochs over the entire dataset. (--filter on a baseline preset stays available as an ablation.)"""
    from utils.config import with_overrides
    from utils.presets import single_turn

    for name, (_, values) in single_turn().items():
        args = with_overrides(rs.Args(), values)
        if name != "cpu":
            assert args.filter is (args.mode == "rema"), name


def test_switch_schedule_epoch_is_a_permutation_of_the_whole_set():
    """100 items, batch 8, a switch every 10 steps: epoch 0 (13 steps, across a phase change) sees each item once."""
    args = rs.Args(schedule="switch", filter=False, rollout_batch_size=8, switch_freq=10, total_steps=40)
    state = dict(step=0, phase=0, epoch=0, batch=0, dataset=None)
    seen = []
    while state["epoch"] == 0:
        order = rs.epoch_order(100, state, args)
        seen += order[state["batch"] * 8:(state["batch"] + 1) * 8]
        state["step"] += 1
        state["phase"], state["epoch"], state["batch"] = rs.switch_position(state["step"], 100, args, 1)
    assert state["phase"] == 1 and sorted(seen) == list(range(100))


# ---- the PPO loss ----
def test_policy_loss_clipping():
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    mask = torch.ones(1, 4)
    loss, low, high, kl = rs.policy_loss_terms(logp, old, adv, mask, 0.2, 0.2)
    # ratio 1.5, A=+1: -min(1.5, 1.2) = -1.2 (clipped above); ratio 1.5, A=-1: -min(-1.5, -1.2) = 1.5 (not clipped)
    # ratio 0.5, A=-1: -min(-0.5, -0.8) = 0.8 (clipped below); ratio 0.5, A=+1: -min(0.5, 0.8) = -0.5
    assert loss.tolist()[0] == pytest.approx([-1.2, 1.5, 0.8, -0.5])
    assert high.tolist()[0] == [1.0, 0.0, 0.0, 0.0]
    assert low.tolist()[0] == [0.0, 0.0, 1.0, 0.0]
    assert kl is None
    # clip-higher: epsilon_high 0.28 lets the ratio reach 1.28
    loss, _, _, _ = rs.policy_loss_terms(logp, old, adv, mask, 0.2, 0.28)
    assert loss[0, 0].item() == pytest.approx(-1.28)


def test_policy_loss_k3_kl_and_mask():
    logp = torch.zeros(1, 2)
    ref = torch.full((1, 2), math.log(2.0))
    mask = torch.tensor([[1.0, 0.0]])
    loss, _, _, kl = rs.policy_loss_terms(logp, logp.clone(), torch.zeros(1, 2), mask, 0.2, 0.2, ref, beta=0.5)
    # k3 = exp(log 2) - log 2 - 1 = 0.30685; the loss adds beta * k3 on unmasked tokens only
    assert kl[0, 0].item() == pytest.approx(2 - math.log(2) - 1)
    assert loss.tolist()[0] == pytest.approx([0.5 * (1 - math.log(2)), 0.0])


@pytest.mark.parametrize("loss_type,norm,expected", [
    ("grpo", 2.0, (3 / 2 + 9 / 3) / 2),  # mean of per-sequence means
    ("dapo", 5.0, 12 / 5),  # mean over the 5 tokens
    ("dr_grpo", 8.0, 12 / 8),  # sum / (2 sequences x max length 4)
])
def test_aggregate(loss_type, norm, expected):
    values = torch.tensor([[1.0, 2.0, 0.0], [3.0, 3.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert rs.aggregate(values, mask, loss_type, norm).item() == pytest.approx(expected)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_sum_to_the_mini_batch_loss(loss_type):
    """Gradient accumulation: micro-batch shares with the mini-batch normaliser add up to the one-batch loss."""
    torch.manual_seed(0)
    values = torch.rand(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    norm = {"grpo": 6.0, "dapo": mask.sum().item(), "dr_grpo": 6.0 * 5}[loss_type]
    whole = rs.aggregate(values * mask, mask, loss_type, norm)
    parts = sum(rs.aggregate(values[i : i + 2] * mask[i : i + 2], mask[i : i + 2], loss_type, norm) for i in (0, 2, 4))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


# ---- filtering and schedule ----
def test_filter_by_success_inclusive_bounds():
    qs = ["a", "b", "c", "d", "e"]
    correct = [1, 1, 1, 1, 1,  1, 0, 0, 0, 0,  1, 1, 1, 1, 0,  0, 0, 0, 0, 0,  1, 1, 0, 0, 0]
    kept, succ = rs.filter_by_success(qs, correct, 5, 0.2, 0.8)
    assert succ == pytest.approx([1.0, 0.2, 0.8, 0.0, 0.4])
    assert kept == ["b", "c", "e"]  # 0.2 and 0.8 are kept; all-correct and all-wrong are not
    kept, _ = rs.filter_by_success(qs, correct, 5, 0.0, 1.0)  # the filter switched wide open keeps everything
    assert kept == qs


def test_schedule_phases():
    agents = ["meta_thinking", "reasoning"]
    assert rs.schedule_phases(agents, "alternate", 2, "reasoning", 0, 10) == ["reasoning", "meta_thinking"] * 2
    assert rs.schedule_phases(agents, "alternate", 1, "meta_thinking", 0, 10) == ["meta_thinking", "reasoning"]
    # switch: ceil(25 / 10) = 3 blocks, MTA first
    assert rs.schedule_phases(agents, "switch", 0, "reasoning", 25, 10) == ["meta_thinking", "reasoning", "meta_thinking"]
    assert rs.schedule_phases(["policy"], "alternate", 3, "reasoning", 0, 10) == ["policy"] * 3


# ---- tensors from token ids ----
def test_collate_masks_come_from_lengths_not_pad_ids():
    eos = pad = 2  # SmolLM2: the pad token is the end-of-turn token
    batch = collate([[5, 6, 7], [8]], [[9, eos], [10, 11, 12]], pad, "cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, eos, pad], [pad, pad, 8, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    # the sampled EOS (equal to the pad id) is trained on; the padding after it is not
    assert batch["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_select_trims_padding_columns():
    batch = collate([[5, 6, 7], [8]], [[9, 2], [10, 11, 12]], 2, "cpu")
    batch["advantages"] = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    sub = select(batch, torch.tensor([0]))
    assert sub["input_ids"].tolist() == [[5, 6, 7, 9, 2]]  # the completion column only row 1 used is cut
    assert sub["completion_mask"].tolist() == [[1, 1]]
    assert sub["advantages"].tolist() == [[1.0, 2.0]]
    sub = select(batch, torch.tensor([1]))
    assert sub["input_ids"].tolist() == [[8, 10, 11, 12]]  # leading prompt padding is cut
    assert sub["position_ids"].tolist() == [[0, 1, 2, 3]]


def test_completion_logprobs_match_a_plain_forward(tiny_model):
    """Parity: log-probs from the padded, logits_to_keep path equal log_softmax of an unpadded forward."""
    from utils.models import load_model

    model = load_model(str(tiny_model)).eval()
    prompts_ = [[11, 12, 13, 14], [21, 22]]
    completions = [Completion([31, 32], False), Completion([41, 42, 43], True)]
    batch = collate(prompts_, [c.ids for c in completions], 2, "cpu")
    with torch.no_grad():
        logp, entropy = rs.completion_logprobs(model, batch, 1.0, torch.autocast("cpu", enabled=False), with_entropy=True)
        for i, (p, c) in enumerate(zip(prompts_, completions)):
            ids = torch.tensor([p + c.ids])
            ref = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1].float(), -1)  # (len(c), V)
            expected = ref.gather(-1, torch.tensor(c.ids)[:, None]).squeeze(-1)
            assert logp[i, : len(c.ids)].tolist() == pytest.approx(expected.tolist(), abs=1e-4)
            ent = -(ref.exp() * ref).sum(-1)
            assert entropy[i, : len(c.ids)].tolist() == pytest.approx(ent.tolist(), abs=1e-3)


def test_generate_left_padding_does_not_change_greedy_output(tiny_model):
    from utils.generation import generate
    from utils.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model))
    short = tokenizer("What is 1 + 2?", add_special_tokens=False)["input_ids"]
    long = tokenizer("Here is a much longer question: what is 10 + 20 + 30?", add_special_tokens=False)["input_ids"]
    kw = dict(max_new_tokens=6, temperature=0.0, stop_ids=[tokenizer.eos_token_id])
    alone = generate(model, tokenizer, [short], **kw)[0]
    batched = generate(model, tokenizer, [long, short], **kw)[1]
    assert batched.ids == alone.ids
    assert len(alone.ids) <= 6


class FakeAccelerator:
    def __init__(self, num_processes=1, distributed_type="NO"):
        self.num_processes, self.distributed_type = num_processes, distributed_type


def test_validate_rejects_bad_combinations():
    with pytest.raises(SystemExit, match="multiple of the number of processes"):
        rs.validate(rs.Args(rollout_batch_size=3), FakeAccelerator(2))
    with pytest.raises(SystemExit, match="--no-filter"):
        rs.validate(rs.Args(schedule="switch"), FakeAccelerator())
    with pytest.raises(SystemExit, match="num_generations >= 2"):
        rs.validate(rs.Args(advantage_estimator="grpo", num_generations=1), FakeAccelerator())
    rs.validate(rs.Args(), FakeAccelerator())  # the defaults are valid


def test_shard_pads_uneven_shares():
    # 5 items over 2 processes: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and a copy of 3 as padding
    assert shard([0, 1, 2, 3, 4], 0, 2) == ([0, 2, 4], 3)
    assert shard([0, 1, 2, 3, 4], 1, 2) == ([1, 3, 3], 2)
    assert shard([7], 1, 2) == ([7], 0)  # nothing real on rank 1: it still runs one (discarded) item


@pytest.mark.parametrize("param_mode", ["full", "lora"])
def test_reference_model_only_when_beta_positive(tiny_model, param_mode):
    """beta = 0 loads no reference model; with LoRA the reference is the base with adapters off, never a copy."""
    from accelerate import Accelerator

    from utils.models import build_agents

    names = ["meta_thinking", "reasoning"]
    for beta in (0.0, 0.1):
        args = rs.Args(lm=ModelArgs(param_mode=param_mode, gradient_checkpointing=False), beta=beta)
        agents = build_agents(args, Accelerator(cpu=True), str(tiny_model), {n: 8 for n in names}, reference=beta > 0)
        assert set(agents) == set(names)
        has_copy = [a.ref_model is not None for a in agents.values()]
        assert has_copy == [beta > 0 and param_mode == "full"] * 2
        # separate parameters: the two agents train disjoint parameter sets
        ids = [{id(p) for p in a.params} for a in agents.values()]
        assert ids[0] and ids[1] and not ids[0] & ids[1]


# ---- importance weights against the sampler (vLLM samples; utils/sampling.importance_weights) ----
OLD = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
SAMPLER = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -0.5, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # log w = [[0.5, -1, -], [0.5, 0, -0.5]]


@pytest.mark.parametrize("mode,cap,weights,over", [
    ("token_truncate", 1.5, [[1.5, math.exp(-1), 0.0], [1.5, 1.0, math.exp(-0.5)]], 2),  # e^0.5 = 1.65 > 1.5: cut
    ("token_mask", 1.5, [[0.0, math.exp(-1), 0.0], [0.0, 1.0, math.exp(-0.5)]], 2),  # ... or dropped
    ("sequence_truncate", 1.5, [[math.exp(-0.5)] * 2 + [0.0], [1.0] * 3], 0),  # products e^-0.5 and e^0
    ("sequence_truncate", 0.9, [[math.exp(-0.5)] * 2 + [0.0], [0.9] * 3], 1),
    ("sequence_mask", 0.9, [[math.exp(-0.5)] * 2 + [0.0], [0.0] * 3], 1),
])
def test_importance_weights_by_hand(mode, cap, weights, over):
    from utils.sampling import importance_weights

    w, stats = importance_weights(OLD, SAMPLER, MASK, mode, cap)
    assert w.tolist() == [pytest.approx(row, abs=1e-6) for row in weights]
    units = 5 if mode.startswith("token") else 2  # a weight per trained token, or per sequence
    per_unit = [x for row, m in zip(weights, MASK.tolist()) for x, k in zip(row, m) if k] if units == 5 else [r[0] for r in weights]
    assert stats["is_units"] == units and stats["is_over_cap"] == over
    assert stats["is_weight"] == pytest.approx(sum(per_unit), abs=1e-6)


def test_importance_weights_scale_the_policy_term_not_the_kl():
    logp, old = torch.zeros(1, 2), torch.zeros(1, 2)
    adv, mask, w = torch.ones(1, 2), torch.ones(1, 2), torch.tensor([[0.5, 2.0]])
    ref = torch.full((1, 2), math.log(2.0))  # k3 KL with pi_ref / pi = 2: 2 - log 2 - 1
    loss, _, _, kl = rs.policy_loss_terms(logp, old, adv, mask, 0.2, 0.2, ref, beta=0.1, is_weight=w)
    k3 = 2.0 - math.log(2.0) - 1
    assert loss.tolist() == [pytest.approx([-0.5 + 0.1 * k3, -2.0 + 0.1 * k3])]
