"""Single-turn ReMA: a meta-thinking agent plans, a reasoning agent solves, both trained with RL (paper Sec. 3.2.1).

    m ~ pi_h(. | x)            the meta-thinking agent (MTA) writes a high-level plan m for question x
    y ~ pi_l(. | x, m)         the reasoning agent (RA) solves x following m, answer in \\boxed{}

Separate parameters, trained alternately (Algorithm 1): for #UpdateIteration rounds, build D_l with the prompt
filter and train pi_l on it for #TrainingEpisode epochs with pi_h frozen, then build D_h and train pi_h with
pi_l frozen. Rewards (App. C.2):
    R_l = +1 if y is correct, -0.5 if wrong but boxed, -1 if no boxed answer
    R_h = mean correctness of the RA's answers under m, -1 if m itself contains \\boxed (answer leak)
Advantages: REINFORCE++ (paper; k1 KL to the reference inside the reward, batch-whitened returns), GRPO or RLOO.
Update: PPO clipped surrogate. `--mode vrp` / `--mode mrp` train one agent with the chain-of-thought or the
plan-then-solve prompt and the same estimator: the baselines of Table 1. `--preset paper-qwen2.5-7b` (and the
other presets in utils/presets.py) runs a configuration of the paper; the default, `--preset cpu`, fits a laptop CPU.

Dimensions: B prompts per step (global), G = num_generations samples per prompt, K = RA samples per plan,
N = sequences on this rank, P prompt tokens, C completion tokens, V vocabulary.

Departures from the paper / official code, all deliberate:
 1. The paper's single-turn code (OpenRLHF) is not public; REINFORCE++ is OpenRLHF's estimator (docs/algorithm.md §4).
 2. The RA prompt says \\boxed{} (paper App. G), not the official code's literal \\boxed{{}}.
 3. The MTA leak penalty is added to R_h (the paper does not say added or replaced); R_h averages
    `reas_samples_per_plan` RA samples per plan (not given in the paper; the paper presets take App. D.1's 4, which
    `--reas_samples_per_plan None` gives; the CPU default is 6, item 11).
 4. With GRPO / RLOO the KL term (if beta > 0) is a k3 penalty in the loss (as in TRL), not in the reward.
 5. The official schedule (`--schedule switch`) starts a fresh block every switch_freq steps from step 0, without
    the official code's 9-step first block.
 6. Log-probs are computed from the sampled token ids, never from decoded-then-re-encoded text.
 7. With `--backend vllm` the loss is weighted by the truncated importance ratio pi_old / pi_vLLM (TRL and verl do
    the same; utils/sampling.py): the engine's bf16 kernels sample from a slightly different policy than pi_old.
 8. The grader reads the reply's final answer (the last box, or the answer it commits to) and compares it whole;
    `--grading.grader official` restores the official configuration (docs/grading.md).
 9. GRPO divides by the group's std + 1e-4 (TRL's epsilon); rema_multiturn.py keeps the official code's 1e-6.
10. Not stated in the paper, chosen here: each agent's AdamW state persists across the phases and rounds of
    Algorithm 1, and the KL reference stays the initial model for the whole run. The prompt filter is ReMA's (App.
    D.1): `--mode vrp|mrp` and the VRP / MRP paper presets train unfiltered unless `--filter` is given.
11. CPU-sized defaults (`--preset cpu`, chosen on the training reward and on training questions): `a + b` and
    SmolLM2-135M; a worked example (7 + 5) in the RA's prompt (`--one_shot`: zero-shot the 135M RA boxes none of its
    greedy answers); temperature 0.7; 3 samples per prompt; R_h over 6 RA answers per plan (with 2, its noise let the
    MTA's phase undo the RA's gains); 32-token plans and solutions; 2 epochs per phase, one round; a filter pool of 32;
    100 held-out sums, evaluated at start and end; no gradient checkpointing. Flag docstrings give the paper's values.
"""

import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

import torch
from accelerate.utils import gather_object

from utils.batch import collate, select, update_sizes
from utils.config import (Annotated, DataArgs, FilterArgs, Flat, GenerationArgs, GradingArgs, JudgeArgs, LoraArgs,
                          ModelArgs, OptimizerArgs, RunArgs, VLLMArgs, WandbArgs, arithmetic_default, cli)
from utils.data import ArithmeticConfig, DataError
from utils.distributed import clip_grad_norm, gather_real, grad_sync, make_accelerator, shard, shard_marked
from utils.logprobs import completion_logprobs, old_and_ref_logprobs
from utils.presets import single_turn
from utils.run import Run, single_turn_header
from utils.sampling import importance_weights, sampler_logprobs
from utils.task import TASKS
from utils.tracking import filter_stats, single_turn_step_metrics
from utils.validate import TWIN_RANGES, at_least, check_ranges, check_twin_options, requirement

AGENTS = {"rema": ["meta_thinking", "reasoning"], "vrp": ["policy"], "mrp": ["policy"]}
PREFIX = {"meta_thinking": "meta", "reasoning": "reas", "policy": "policy"}


@dataclass
class Args:
    preset: str = "cpu"
    """named configuration whose values replace these defaults (utils/presets.py, listed by --help); flags override it"""
    # ---- method ----
    mode: Literal["rema", "vrp", "mrp"] = "rema"
    """rema: MTA + RA (Table 1 'ReMA'); vrp: one agent, chain-of-thought prompt; mrp: one agent, plan then solve"""
    schedule: Literal["alternate", "switch"] = "alternate"
    """alternate: the paper's Algorithm 1 with prompt filtering; switch: the official code's schedule (switch the trained agent every switch_freq steps, no filtering)"""
    num_update_iterations: int = 1
    """#UpdateIteration of Algorithm 1 (paper: 3 for Llama3/3.1-8B, 10 for Qwen2.5-7B on MATH; 1 on RewardBench)"""
    num_train_epochs: int = 2
    """#TrainingEpisode: RL epochs over the filtered dataset per agent and round (paper: 4 on MATH)"""
    first_agent: Literal["reasoning", "meta_thinking"] = "reasoning"
    """which agent each round trains first (Algorithm 1: the reasoning agent; App. C.4 and the official code: the MTA)"""
    switch_freq: int = 10
    """schedule=switch: steps per block of one agent (official default 10)"""
    total_steps: int = 40
    """schedule=switch: training steps in the run"""
    meta_reward: str = "accuracy"
    """R_h, one of META_SCORES: accuracy (mean RA correctness under the plan; paper) or consistency (App. E.1)"""
    filter: bool = True
    """schedule=alternate: build D_l / D_h with the prompt filter (App. D.1: ReMA's); --no-filter: the whole train set.
    Unless given, on for --mode rema, off for vrp / mrp (their #TrainingEpisode: epochs over all of it), see FOLLOWS"""
    prompt_filter: FilterArgs = field(default_factory=FilterArgs)
    one_shot: bool = True
    """a worked example (7 + 5) as an earlier exchange in the prompt of the agent that answers (RA, VRP, MRP), not the
    MTA's (not in the paper). Unless given, on for --preset cpu on the math task and off otherwise, see FOLLOWS"""
    # ---- rollout ----
    rollout_batch_size: int = 8
    """B: prompts per training step over all processes (paper: 1000); for the RA a prompt is a (question, plan) pair"""
    num_generations: int = 3
    """G: samples per prompt, the group of GRPO / RLOO (paper: 4)"""
    reas_samples_per_plan: int | None = 6
    """K: RA samples per plan that R_h averages when training the MTA (paper: not stated; None: num_generations)"""
    temperature: float = 0.7
    """sampling temperature of the rollouts and of the prompt filter (paper 1.0); evaluation is greedy"""
    meta_max_completion_length: int = 32
    """max new tokens of a plan (paper: 2048)"""
    reas_max_completion_length: int = 32
    """max new tokens of a solution, also the VRP / MRP reply (paper: 2048)"""
    # ---- optimisation ----
    advantage_estimator: str = "reinforce_pp"
    """one of ESTIMATORS: reinforce_pp (the paper's REINFORCE++), grpo (group mean / std), rloo (leave-one-out)"""
    scale_rewards: bool = True
    """grpo: divide by the group std (Dr. GRPO turns this off)"""
    beta: float = 0.0
    """KL coefficient to the initial model (paper 1e-2); 0 loads no reference model"""
    epsilon: float = 0.2
    """PPO clip range (paper 0.2)"""
    epsilon_high: float | None = None
    """upper clip range (DAPO clip-higher); None: epsilon"""
    dual_clip: float | None = None
    """dual clip c: the loss of a negative-advantage token is capped at -A c (OpenRLHF's --dual_clip); None: off,
    as in the paper's single-turn runs (rema_multiturn.py: 3.0, the official multi-turn value)"""
    num_iterations: int = 1
    """PPO updates over each rollout (TRL name; OpenRLHF max_epochs)"""
    mini_batch_size: int | None = None
    """sequences per optimizer step over all processes (paper: 500 of 4000); None: the whole rollout, one step"""
    micro_batch_size: int = 8
    """sequences per forward/backward on each process (gradient accumulation up to the mini-batch)"""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    """token-loss aggregation (TRL names): grpo = mean over each sequence then over sequences; dapo = mean over all tokens; dr_grpo = sum / (sequences x max_completion_length)"""
    optim: Annotated[OptimizerArgs, Flat] = field(default_factory=OptimizerArgs)
    """the optimizer (AdamW, constant learning rate) and the guard against non-finite steps"""
    # ---- plumbing shared with rema_multiturn.py (utils/config.py) ----
    lm: Annotated[ModelArgs, Flat] = field(default_factory=ModelArgs)
    """the model and how it is trained"""
    run: Annotated[RunArgs, Flat] = field(default_factory=lambda: RunArgs(exp_name="rema_single"))
    """the run: name, seed, resume, evaluation, logging and checkpoints"""
    data: Annotated[DataArgs, Flat] = field(default_factory=DataArgs)
    """the task and its train and held-out sets"""
    generation: Annotated[GenerationArgs, Flat] = field(default_factory=GenerationArgs)
    """how samples are generated"""
    arithmetic: ArithmeticConfig = field(default_factory=arithmetic_default)
    """the built-in procedural task and its difficulty knobs"""
    judge: JudgeArgs = field(default_factory=JudgeArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    vllm: VLLMArgs = field(default_factory=VLLMArgs)
    grading: GradingArgs = field(default_factory=GradingArgs)
    wandb: WandbArgs = field(default_factory=WandbArgs)


# ---- DERIVED: every size and choice that follows from the options, decided once (validate(): SETUP, at the end) ------
@dataclass(frozen=True)
class Derived:
    K: int  # RA samples per plan that R_h averages
    steps_per_rollout: int  # optimizer steps per PPO epoch on a rollout of B x G sequences (the header's count)
    recompute_old: bool  # pi_old recomputed before every update (KL in the reward, vLLM; >1 step: learn() decides)
    loss_beta: float  # the coefficient of the k3 KL term in the loss (GRPO / RLOO; 0 when the KL is in the reward)
    eps_high: float  # upper clip range
    is_mode: str  # importance weighting against the sampler: "none" unless generation runs on vLLM


def derive(args: Args, accelerator) -> Derived:
    validate(args, accelerator)
    estimator, vllm = ESTIMATORS[args.advantage_estimator], args.generation.backend == "vllm"
    _, steps = update_sizes(args.rollout_batch_size * args.num_generations, args, accelerator.num_processes)
    kl_in_reward = estimator.kl_in_reward and args.beta > 0
    return Derived(K=args.reas_samples_per_plan or args.num_generations, steps_per_rollout=steps,
                   recompute_old=args.num_iterations > 1 or kl_in_reward or vllm,
                   loss_beta=0.0 if estimator.kl_in_reward else args.beta,
                   eps_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
                   is_mode=args.vllm.importance_sampling_mode if vllm else "none")


# ---- ROLLOUT: one function per kind of training step; each returns sequences and one reward per sequence -----------
def rollout_reasoning(items, agent, agents, sampler, task, args, step) -> dict:
    """RA step (and VRP / MRP): items hold (question, plan); the agent samples G solutions per item; reward R_l."""
    G = args.num_generations
    if args.mode == "rema" and args.schedule == "switch":  # the frozen MTA plans on the fly (D_l items carry theirs)
        _, plans = sampler(agents["meta_thinking"], [task.meta_prompt(it) for it in items], args.temperature,
                           "rollout meta_thinking (frozen)", [("plan", step, it["uid"]) for it in items])
        items = [it | {"plan": m} for it, m in zip(items, plans)]
    prompts = [task.reas_prompt(it, it["plan"]) if args.mode == "rema" else task.single_prompt(it, args.mode) for it in items]
    completions, texts = sampler(agent, [p for p in prompts for _ in range(G)], args.temperature, f"rollout {agent.name}",
                                 [("rollout", step, it["uid"], g) for it in items for g in range(G)])
    with sampler.timed("rewards"):
        correct = task.score(texts, [it for it in items for _ in range(G)])
    rewards = [reas_reward(c, t, task) for c, t in zip(correct, texts)]
    shows = [dict(question=it["question"], plan=it.get("plan"), solution=texts[i * G], gold=it["answer"],
                  reward=rewards[i * G]) for i, it in enumerate(items)]
    return dict(prompt_ids=[p for p in prompts for _ in range(G)], completions=completions, rewards=rewards,
                correct=correct, shows=shows, group_size=G)


def rollout_meta(items, agent, agents, sampler, task, args, step, K) -> dict:
    """MTA step: the MTA samples G plans per question; the frozen RA writes K solutions under each; reward R_h."""
    G = args.num_generations
    prompts = [task.meta_prompt(it) for it in items]
    completions, plans = sampler(agent, [p for p in prompts for _ in range(G)], args.temperature, "rollout meta_thinking",
                                 [("rollout", step, it["uid"], g) for it in items for g in range(G)])
    planned = [it for it in items for _ in range(G)]  # the item of each plan
    _, solutions = sampler(agents["reasoning"], [task.reas_prompt(it, m) for it, m in zip(planned, plans) for _ in range(K)],
                           args.temperature, "rollout reasoning (frozen)",
                           [("solution", step, it["uid"], g, k) for it in items for g in range(G) for k in range(K)])
    with sampler.timed("rewards"):
        correct = task.score(solutions, [it for it in planned for _ in range(K)])
    rewards = [meta_reward(plans[i], solutions[i * K:(i + 1) * K], correct[i * K:(i + 1) * K], args.meta_reward, task,
                           args) for i in range(len(plans))]
    shows = [dict(question=it["question"], plan=plans[i * G], solution=solutions[i * G * K], gold=it["answer"],
                  reward=rewards[i * G]) for i, it in enumerate(items)]
    return dict(prompt_ids=[p for p in prompts for _ in range(G)], completions=completions, rewards=rewards,
                correct=correct, shows=shows, group_size=G)


# ---- REWARDS (App. C.2, App. E.1) ---------------------------------------------------------------------------------
def reas_reward(correct: float, solution: str, task=TASKS["math"]()) -> float:
    """R_l: +1 correct, -0.5 wrong but in the answer format, -1 not in the format (no \\boxed answer; no verdict)."""
    if correct > 0:
        return 1.0
    return -0.5 if task.in_format(solution) else -1.0


# A meta score sees what a plan-level reward could need (the RA's solutions under the plan, their correctness, the task,
# the plan, the options); R_h and the D_h prompt filter both call META_SCORES[--meta_reward]: a fork moves both.
def accuracy_score(solutions: list[str], correct: list[float], task, plan: str = "", args=None) -> float:
    """The paper's R_h before the leak penalty: the mean correctness of the RA's answers under the plan."""
    return sum(correct) / len(correct)


def consistency_score(solutions: list[str], correct: list[float], task, plan: str = "", args=None) -> float:
    """App. E.1: the share of the most common answer; 0 if most solutions give no answer."""
    answers = [task.answer(s) for s in solutions]
    given = [a.replace(" ", "") for a in answers if a]
    return 0.0 if len(given) * 2 < len(answers) else max(given.count(a) for a in set(given)) / len(answers)


META_SCORES = {"accuracy": accuracy_score, "consistency": consistency_score}  # --meta_reward picks one


def meta_reward(plan: str, solutions: list[str], correct: list[float], kind: str, task=TASKS["math"](),
                args=None) -> float:
    """R_h for one plan from the K RA solutions written under it; -1 if the plan itself states the answer (a boxed
    answer; for the judge, a verdict [[A]] / [[B]])."""
    return META_SCORES[kind](solutions, correct, task, plan, args) - (1.0 if task.leaks(plan) else 0.0)


# ---- PROMPT FILTERING (App. D.1): D_l and D_h, scored with the rewards above -----------------------------------------
def filter_by_success(questions: list[dict], correct: list[float], num_samples: int, eps_min: float, eps_max: float):
    """succ(x) = share of correct answers among the num_samples answers to x (consecutive in `correct`);
    keep x if eps_min <= succ(x) <= eps_max (bounds inclusive). Returns (kept questions, succ of every question)."""
    assert len(correct) == len(questions) * num_samples
    succ = [sum(correct[i * num_samples:(i + 1) * num_samples]) / num_samples for i in range(len(questions))]
    return [q for q, s in zip(questions, succ) if eps_min <= s <= eps_max], succ


def build_dataset(agent_name, phase, train_set, agents, sampler, task, args, accelerator) -> tuple[list[dict], dict]:
    """D_l (RA: kept questions, each with plans_per_question plans) or D_h (MTA: kept questions). Every process scores
    a slice of the candidates; the kept items are gathered so that every process holds the same dataset. D_h scores
    the RA's greedy answer under each of S plans with the MTA's own score (META_SCORES[--meta_reward])."""
    f, rank, world, T = args.prompt_filter, accelerator.process_index, accelerator.num_processes, args.temperature
    S, pool = f.num_samples, list(range(len(train_set)))
    random.Random(args.run.seed * 100_003 + phase).shuffle(pool)
    pool = pool[: f.pool_size] if f.pool_size is not None else pool
    mine = shard_marked([train_set[i] | {"index": i} for i in pool], rank, world)  # padding: scored, then dropped
    kept, succ_all, keys = mine, [], [("filter", phase, q["index"], s) for q in mine for s in range(S)]
    if args.filter:
        repeated = [q for q in mine for _ in range(S)]  # S answers per question estimate succ(x)
        if agent_name == "meta_thinking":  # D_h: S plans at T, one greedy RA solution under each
            _, plans = sampler(agents["meta_thinking"], [task.meta_prompt(q) for q in repeated], T, "filter D_h: plans", keys)
            _, answers = sampler(agents["reasoning"], [task.reas_prompt(q, m) for q, m in zip(repeated, plans)], 0.0,
                                 "filter D_h: solutions")
        elif args.mode == "rema":  # D_l: one greedy plan, S RA solutions at T under it
            _, plans = sampler(agents["meta_thinking"], [task.meta_prompt(q) for q in mine], 0.0, "filter D_l: greedy plans")
            _, answers = sampler(agents["reasoning"], [task.reas_prompt(q, m) for q, m in zip(mine, plans) for _ in range(S)],
                                 T, "filter D_l: solutions", keys)
        else:  # VRP / MRP baselines: S samples of the single agent at T
            _, answers = sampler(agents["policy"], [task.single_prompt(q, args.mode) for q in repeated], T, "filter: samples", keys)
        with sampler.timed("rewards"):
            correct = task.score(answers, repeated)
        if agent_name == "meta_thinking":  # the plan's own score, as R_h gives it (without the leak penalty)
            correct = [META_SCORES[args.meta_reward]([a], [c], task, m, args) for a, c, m in zip(answers, correct, plans)]
        kept, succ_all = filter_by_success(mine, correct, S, f.eps_min, f.eps_max)
    if agent_name == "reasoning" and args.mode == "rema":
        # each kept question gets plans_per_question plans sampled at T: the (x, m) inputs of D_l
        with_plans = [q for q in kept for _ in range(f.plans_per_question)]
        _, plans = sampler(agents["meta_thinking"], [task.meta_prompt(q) for q in with_plans], T, "D_l: plans",
                           [("plan", phase, q["index"], j) for q in kept for j in range(f.plans_per_question)])
        kept = [q | {"plan": m} for q, m in zip(with_plans, plans)]
    kept = sorted(gather_real(kept, kept), key=lambda q: (q["index"], q.get("plan", "")))  # every process: the same
    return kept, filter_stats(len(pool), kept, gather_real(succ_all, mine))


# ---- ADVANTAGES: each estimator maps the rollout's rewards (N,) to one advantage per token (N, C) -------------------
def reinforce_pp_advantages(rewards, mask, old_logp, ref_logp, group_size, args, accelerator) -> torch.Tensor:
    """REINFORCE++ (OpenRLHF): token rewards r_t = -beta * (logp_t - logp_ref_t) (k1), plus R on the last token;
    returns G_t = sum_{k >= t} r_k (gamma = 1); advantages = returns whitened over all tokens of the global batch, as
    OpenRLHF: (G - mean) / sqrt(max(var, 1e-8)), so that when every outcome ties, the KL noise alone is not blown up
    to unit-variance advantages."""
    token_rewards = torch.zeros_like(mask)  # (N, C)
    if args.beta > 0:
        token_rewards = -args.beta * (old_logp - ref_logp) * mask
    last = mask.sum(-1).long() - 1  # (N,) index of each sequence's last token
    token_rewards[torch.arange(len(rewards)), last] += rewards
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1) * mask  # (N, C)
    stats = torch.stack([returns.sum(), (returns**2).sum(), mask.sum()])
    total, total_sq, count = accelerator.reduce(stats, reduction="sum").tolist()
    mean = total / count
    var = max(total_sq / count - mean**2, 0.0)
    return (returns - mean) / math.sqrt(max(var, 1e-8)) * mask  # OpenRLHF: (x - mean) * rsqrt(max(var, 1e-8))


def grpo_advantages(rewards, mask, old_logp, ref_logp, group_size, args, accelerator) -> torch.Tensor:
    """GRPO: A_i = (R_i - mean_g) / (std_g + 1e-4) (unbiased std, as torch.std / TRL), each group G consecutive."""
    r = rewards.view(-1, group_size)  # (N/G, G)
    adv = r - r.mean(-1, keepdim=True)
    if args.scale_rewards:
        adv = adv / (r.std(-1, keepdim=True) + 1e-4)
    return adv.reshape(-1, 1) * mask


def rloo_advantages(rewards, mask, old_logp, ref_logp, group_size, args, accelerator) -> torch.Tensor:
    """RLOO: A_i = R_i - mean_{j != i} R_j over the G samples of the prompt."""
    r = rewards.view(-1, group_size)  # (N/G, G)
    adv = r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return adv.reshape(-1, 1) * mask


class Estimator(NamedTuple):
    fn: Callable
    kl_in_reward: bool  # the KL to the reference goes into the reward (k1), not into the loss (k3)
    needs_group: bool  # compares the G samples of a prompt: needs num_generations >= 2


ESTIMATORS = {  # --advantage_estimator picks one
    "reinforce_pp": Estimator(reinforce_pp_advantages, kl_in_reward=True, needs_group=False),
    "grpo": Estimator(grpo_advantages, kl_in_reward=False, needs_group=True),
    "rloo": Estimator(rloo_advantages, kl_in_reward=False, needs_group=True),
}


# ---- POLICY LOSS: PPO clipped surrogate, importance-weighted against the sampler -------------------------------------
def ppo_clip_loss(ratio, adv, eps_low, eps_high, dual_clip):
    """l = max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)), then min(l, -A c) where A < 0 (dual clip c; None: off).
    Elementwise; returns the loss and where the low clip, the high clip and the dual clip were active."""
    loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    is_dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        is_dual = (adv < 0) & (loss > -adv * dual_clip)
        loss = torch.where(adv < 0, torch.min(loss, -adv * dual_clip), loss)
    is_low = (ratio < 1 - eps_low) & (adv < 0)
    is_high = (ratio > 1 + eps_high) & (adv > 0)
    return loss, is_low, is_high, is_dual


def policy_loss_terms(logp, old_logp, advantages, mask, eps_low, eps_high, ref_logp=None, beta=0.0, is_weight=None,
                      dual_clip=None):
    """Per-token loss l_t = w_t ppo_clip_loss(rho_t, A_t) (+ beta * k3 KL), rho_t = pi/pi_old, w_t the importance
    weight against the sampler (1 without). All (N, C); returns the loss and the indicators for the metrics."""
    ratio = torch.exp(logp - old_logp)  # (N, C)
    loss, is_low, is_high, is_dual = ppo_clip_loss(ratio, advantages, eps_low, eps_high, dual_clip)  # (N, C)
    if is_weight is not None:
        loss = loss * is_weight
    kl = None
    if ref_logp is not None:
        log_ref_ratio = ref_logp - logp
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # k3 estimator of KL(pi || pi_ref), (N, C)
        loss = loss + beta * kl
    return loss * mask, is_low.float() * mask, is_high.float() * mask, kl


def aggregate(token_values, mask, loss_type, norm) -> torch.Tensor:
    """Sum of this micro-batch's share of the mini-batch loss. `norm` is the mini-batch's global normaliser
    (sequences for grpo, tokens for dapo, sequences x max length for dr_grpo) divided by the world size, so that
    summing over micro-batches and averaging gradients over processes gives exactly the global mean."""
    if loss_type == "grpo":
        return ((token_values.sum(-1) / mask.sum(-1).clamp(min=1)).sum()) / norm
    return token_values.sum() / norm


def loss_normaliser(mask: torch.Tensor, loss_type: str, max_length: int) -> float:
    """This process's part of `aggregate`'s denominator for a mini-batch with completion mask (n, C)."""
    return {"grpo": mask.shape[0], "dapo": mask.sum().item(), "dr_grpo": mask.shape[0] * max_length}[loss_type]


def micro_batch_loss(logp, entropy, micro: dict, args, d, norm):
    """The loss of one micro-batch (its share of the mini-batch mean) and its statistics."""
    m = micro["completion_mask"]
    old_logp = micro["old_logp"] if "old_logp" in micro else logp.detach()
    token_loss, low, high, _ = policy_loss_terms(logp, old_logp, micro["advantages"], m, args.epsilon, d.eps_high,
                                                 micro.get("ref_logp") if d.loss_beta > 0 else None, d.loss_beta,
                                                 micro.get("is_weight"), args.dual_clip)
    loss = aggregate(token_loss, m, args.loss_type, norm)
    stats = dict(loss=loss.item(), clip_low=low.sum().item(), clip_high=high.sum().item(), tokens=m.sum().item(),
                 entropy=(entropy * m).sum().item(), log_ratio=((logp.detach() - old_logp).abs() * m).sum().item())
    if "ref_logp" in micro:
        log_ratio = (micro["ref_logp"] - logp.detach()) * m
        stats["kl"] = ((torch.exp(log_ratio) - log_ratio - 1) * m).sum().item()
    return loss, stats


# ---- UPDATE: PPO epochs over mini- and micro-batches (pi_old and pi_ref: utils/logprobs.old_and_ref_logprobs) ----
def ppo_update(agent, batch: dict, args, d: Derived, mini_batch: int, accelerator, autocast, guard, step: int) -> dict:
    """num_iterations PPO epochs over mini-batches of this process's sequences (mini_batch each: update_sizes),
    gradient accumulation over micro-batches of similar lengths. Returns sums of the loss statistics over the applied
    optimizer steps."""
    mask, world = batch["completion_mask"], accelerator.num_processes
    seq_len = batch["attention_mask"].sum(-1)  # (N,): micro-batches are cut from sequences of similar length
    sums = defaultdict(float)
    agent.model.train()
    for _ in range(args.num_iterations):
        for mb in torch.randperm(len(mask), device=mask.device).split(mini_batch):
            norm = torch.tensor(float(loss_normaliser(mask[mb], args.loss_type, agent.max_completion_length)), device=mask.device)
            norm = accelerator.reduce(norm, reduction="sum") / world  # the global denominator, per process
            micros = mb[seq_len[mb].argsort()].split(args.micro_batch_size)
            mb_sums = defaultdict(float)  # this mini-batch's loss and statistics, kept if its step is applied
            for j, idx in enumerate(micros):
                micro = select(batch, idx)
                with grad_sync(accelerator, agent.model, sync=j == len(micros) - 1):
                    logp, entropy = completion_logprobs(agent.model, micro, args.temperature, autocast, with_entropy=True)
                    loss, stats = micro_batch_loss(logp, entropy, micro, args, d, norm)
                    accelerator.backward(loss)
                for k, v in stats.items():
                    mb_sums[k] += v
            grad_norm = clip_grad_norm(accelerator, agent.params, args.optim.max_grad_norm)  # equal on every process
            if guard.step_ok(grad_norm, step, accelerator.is_main_process):  # a NaN / inf gradient is never applied
                agent.optimizer.step()
                for k, v in mb_sums.items():
                    sums[k] += v
                sums["grad_norm"] += grad_norm
                sums["steps"] += 1
            agent.optimizer.zero_grad(set_to_none=True)
    return sums


def learn(agent, rollout: dict, args, d: Derived, sampler, tokenizer, accelerator, autocast, guard, step: int) -> dict:
    """Train `agent` on its rollout (a sequence and a reward per completion, groups of rollout["group_size"]): pi_old
    (and pi_ref), the advantages, the PPO update, sized from this batch (update_sizes). Returns the step's metrics."""
    world = accelerator.num_processes
    batch = collate(rollout["prompt_ids"], [c.ids for c in rollout["completions"]], tokenizer.pad_token_id,
                    accelerator.device)
    mask = batch["completion_mask"]  # (N, C)
    rewards = torch.tensor(rollout["rewards"], dtype=torch.float32, device=accelerator.device)  # (N,)

    # ---- OLD AND REFERENCE LOG-PROBS, and with vLLM the importance weights against its samples ----
    agent.activate()  # LoRA: this agent's adapter on (the rollout may have left another's on)
    mini_batch, steps = update_sizes(len(mask) * world, args, world)  # from the batch that is trained
    with sampler.timed("logprobs"):
        old_and_ref_logprobs(agent, batch, d.recompute_old or steps * args.num_iterations > 1, args.beta > 0, args,
                             autocast)
    sampled = sampler_logprobs(rollout["completions"], mask)  # (N, C) vLLM's log-probs; None with HF
    gap, is_stats = sampler.before_update(agent, batch.get("old_logp"), sampled, mask), {}  # vLLM: sampler vs pi_old
    if d.is_mode != "none" and sampled is not None:
        batch["is_weight"], is_stats = importance_weights(batch["old_logp"], sampled, mask, d.is_mode,
                                                          args.vllm.importance_sampling_cap)

    # ---- ADVANTAGES, one per token: (N, C) ----
    batch["advantages"] = ESTIMATORS[args.advantage_estimator].fn(
        rewards, mask, batch.get("old_logp"), batch.get("ref_logp"), rollout["group_size"], args, accelerator)

    # ---- UPDATE: PPO epochs over mini-batches, gradient accumulation over micro-batches ----
    with sampler.timed("update"):
        sums = ppo_update(agent, batch, args, d, mini_batch, accelerator, autocast, guard, step)
    metrics = single_turn_step_metrics(PREFIX[agent.name], rollout, mask, sums, is_stats, rollout["group_size"],
                                        agent.optimizer.param_groups[0]["lr"], accelerator)
    return metrics | gap | sampler.after_update(agent)  # vLLM: the new weights pushed, and checked


# ---- SCHEDULE (Algorithm 1, or the official switch) ------------------------------------------------------------------
def schedule_phases(agents: list[str], schedule: str, num_update_iterations: int, first_agent: str,
                    total_steps: int, switch_freq: int) -> list[str]:
    """The agent trained in each phase. alternate: per round the first agent then the other (Algorithm 1);
    switch: blocks of switch_freq steps, starting with the meta-thinking agent (official code)."""
    if schedule == "alternate":
        order = agents if first_agent == agents[0] or len(agents) == 1 else agents[::-1]
        return [a for _ in range(num_update_iterations) for a in order]
    return [agents[b % len(agents)] for b in range(math.ceil(total_steps / switch_freq))]


def phase_steps(agent_name: str, questions: int, args: Args, built: bool = False) -> int:
    """Steps of a phase whose dataset holds `questions` questions (built: `questions` is the dataset's size already,
    D_l's plans included): each epoch, ceil(items / B) steps."""
    items = questions * (args.prompt_filter.plans_per_question if not built and agent_name == "reasoning"
                         and args.mode == "rema" else 1)
    return math.ceil(items / args.rollout_batch_size) * args.num_train_epochs


def epoch_order(dataset_size: int, state: dict, args: Args) -> list[int]:
    """This epoch's order of the dataset: a permutation seeded by the epoch and, under the alternate schedule, by the
    phase (each phase has a dataset of its own). Under the switch schedule the agents change in the middle of an epoch
    over the one train set: the order must not change with them, or an epoch would see some items twice."""
    phase = state["phase"] if args.schedule == "alternate" else 0
    perm = list(range(dataset_size))
    random.Random(args.run.seed * 7919 + phase * 101 + state["epoch"]).shuffle(perm)
    return perm


def batches_per_epoch(dataset_size: int, args: Args, world: int) -> int:
    """Batches of B items in an epoch over the dataset; a shorter last one counts if it gives every process an item."""
    return dataset_size // args.rollout_batch_size + (dataset_size % args.rollout_batch_size >= world)


def switch_position(step: int, dataset_size: int, args: Args, world: int) -> tuple[int, int, int]:
    """The switch schedule at `step`: (its block of switch_freq steps, epoch over the whole train set, batch)."""
    batches = batches_per_epoch(dataset_size, args, world)
    assert batches >= 1, f"the train set ({dataset_size} rows) has fewer rows than processes ({world})"
    return step // args.switch_freq, *divmod(step, batches)


# ---- EVALUATION: greedy pass@1 on the held-out set -----------------------------------------------------------------
def evaluate(eval_set, agents, sampler, task, args, accelerator) -> dict:
    mine, n_real = shard(eval_set, accelerator.process_index, accelerator.num_processes)
    leaks = []
    if args.mode == "rema":
        _, plans = sampler(agents["meta_thinking"], [task.meta_prompt(q) for q in mine], 0.0, "eval: plans")
        leaks = gather_object([float(task.leaks(m)) for m in plans][:n_real])
        completions, sols = sampler(agents["reasoning"], [task.reas_prompt(q, m) for q, m in zip(mine, plans)], 0.0,
                                    "eval: solutions")
    else:
        completions, sols = sampler(agents["policy"], [task.single_prompt(q, args.mode) for q in mine], 0.0, "eval")
    with sampler.timed("rewards"):
        correct = task.score(sols, mine)
    rows = gather_object([(c, float(task.in_format(s)), len(x.ids)) for c, s, x in zip(correct, sols, completions)][:n_real])
    out = {"eval/accuracy": sum(r[0] for r in rows) / len(rows), "eval/boxed_ratio": sum(r[1] for r in rows) / len(rows),
           "eval/mean_length": sum(r[2] for r in rows) / len(rows), "eval/questions": len(rows)}
    return out | ({"eval/meta_boxed_ratio": sum(leaks) / len(leaks)} if leaks else {})


# ---- THE TRAINING LOOP ---------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    accelerator = make_accelerator(find_unused_parameters=args.lm.param_mode == "lora")  # the idle adapter gets no grad
    d = derive(args, accelerator)  # every derived size and choice, decided once
    rank, world = accelerator.process_index, accelerator.num_processes
    names = AGENTS[args.mode]
    lengths = {n: args.meta_max_completion_length if n == "meta_thinking" else args.reas_max_completion_length for n in names}
    run = Run(args, accelerator, "rema_single.py", lengths, reference=args.beta > 0,
              initial_state=dict(phase=0, epoch=0, batch=0, dataset=None), max_model_len=args.vllm.max_model_len)
    agents, sampler, task, train_set, state = run.agents, run.sampler, run.task, run.train_set, run.state
    phases = schedule_phases(names, args.schedule, args.num_update_iterations, args.first_agent, args.total_steps,
                             args.switch_freq)
    run.start(single_turn_header(args, d.steps_per_rollout * args.num_iterations, phases, len(names)),
              args.total_steps if args.schedule == "switch" else  # each phase: at most its whole pool kept
              [phase_steps(n, args.prompt_filter.pool_size or len(train_set), args) for n in phases],
              lambda: evaluate(run.eval_set, agents, sampler, task, args, accelerator), "single")

    def train_step(agent, dataset: list[dict], order: list[int], batch: int, phase: int) -> bool:
        """One step on batch `batch` of `order`: rollout -> rewards -> advantages -> update -> log; False: time is up."""
        idx = order[batch * args.rollout_batch_size:(batch + 1) * args.rollout_batch_size]
        idx = idx[: len(idx) // world * world]  # every process gets the same number of items
        items = [dataset[i] | {"uid": i} for i in idx[rank::world]]  # uid: keys the samples' random streams
        t0 = run.step_began()

        # ---- ROLLOUT: samples and rewards ----
        if agent.name == "meta_thinking":
            rollout = rollout_meta(items, agent, agents, sampler, task, args, state["step"], d.K)
        else:
            rollout = rollout_reasoning(items, agent, agents, sampler, task, args, state["step"])
        timing = run.rollout_done(t0)

        # ---- OLD LOG-PROBS -> ADVANTAGES -> UPDATE of the agent on its rollout ----
        metrics = learn(agent, rollout, args, d, sampler, run.tokenizer, accelerator, run.autocast, run.guard,
                        state["step"] + 1)

        # ---- METRICS ----
        metrics |= (state.pop("filter_stats", None) or {}) | {"train/agent": float(names.index(agent.name)),
                                                              "train/phase": float(phase)}
        return run.step_done(metrics, t0, timing, rollout["shows"], {k: v for k, v in metrics.items() if k.endswith("/reward")})

    def algorithm_1() -> None:
        """Per round, each agent in turn: its dataset (D_l / D_h, App. D.1), then epochs of batches. A resumed run
        enters these loops at its saved (phase, epoch, batch)."""
        phase_ended = False  # did the last step end a phase? (its checkpoint is due)
        for phase in range(state["phase"], len(phases)):
            run.between_steps(phase_ended)  # before this phase's filtering: the checkpoint at the end of the last phase
            agent = agents[phases[phase]]
            if state["dataset"] is None:  # ---- PROMPT FILTERING: D_l / D_h for this phase (App. D.1) ----
                t0 = time.time()
                dataset, fstats = build_dataset(agent.name, phase, train_set, agents, sampler, task, args, accelerator)
                state["dataset"], state["filter_stats"] = dataset, fstats | {"time/filter": time.time() - t0}
                run.progress.phase(phase, agent.name, fstats, phase_steps(agent.name, len(dataset), args, built=True))
            dataset = state["dataset"]
            for epoch in range(state["epoch"], args.num_train_epochs):
                order = epoch_order(len(dataset), state, args)
                for batch in range(state["batch"], batches_per_epoch(len(dataset), args, world)):
                    run.between_steps(phase_ended)
                    go_on = train_step(agent, dataset, order, batch, phase)
                    state["batch"], phase_ended = batch + 1, False  # the next step's position
                    if not go_on:
                        return
                state["epoch"], state["batch"] = epoch + 1, 0
            state["phase"], state["epoch"], state["dataset"], phase_ended = phase + 1, 0, None, True

    def switch_schedule() -> None:
        """The official code's schedule: blocks of switch_freq steps, the agents in turn, over epochs of the whole
        (unfiltered) train set that run on across the blocks."""
        first = state["step"]
        for step in range(first, args.total_steps):
            run.between_steps(step > first and step % args.switch_freq == 0)  # a block ended: its checkpoint is due
            state["phase"], state["epoch"], batch = switch_position(step, len(train_set), args, world)
            order = epoch_order(len(train_set), state, args)
            if not train_step(agents[phases[state["phase"]]], train_set, order, batch, state["phase"]):
                return

    with run.session():  # the end: the last evaluation and checkpoint; SIGTERM: the last step saved, exit 0
        algorithm_1() if args.schedule == "alternate" else switch_schedule()


# ---- SETUP: validate the options, then decide every derived value once ---------------------------------------------
# the valid range of each numeric option of Args (the shared groups': utils/validate.py, SHARED), checked right after
# parsing (parse_args) and again by validate(): a bad value exits with status 2 and a message naming the flag
RANGES = TWIN_RANGES | {
    "num_update_iterations": at_least(1), "num_train_epochs": at_least(1), "reas_samples_per_plan": at_least(1),
    "meta_max_completion_length": at_least(1), "reas_max_completion_length": at_least(1),
    "beta": at_least(0),  # 0: no KL term, no reference model
}


FOLLOWS = {  # options whose default follows other options, unless given on the command line (utils.config.cli)
    "filter": lambda args: args.mode == "rema",  # the prompt filter is ReMA's (App. D.1), not the baselines'
    "one_shot": lambda args: args.preset == "cpu" and args.data.task == "math",  # the paper's prompts have none
}


def parse_args() -> Args:
    """The command line over its preset, every numeric option checked against its range before anything loads."""
    return check_ranges(cli(Args, single_turn(), "rema_single.py", FOLLOWS), RANGES, "rema_single.py")


def validate(args: Args, accelerator) -> None:
    """The ranges, then the options that depend on each other or on the number of processes; a violation prints
    its message to stderr and exits with status 2."""
    check_ranges(args, RANGES, "rema_single.py")
    need, f = requirement("rema_single.py"), args.prompt_filter
    check_twin_options(args, need, accelerator.num_processes, ESTIMATORS, args.rollout_batch_size * args.num_generations,
                       "rollout_batch_size x num_generations")
    need(args.meta_reward in META_SCORES, f"--meta_reward must be one of {', '.join(META_SCORES)}")
    need(args.mode == "rema" or args.meta_reward == "accuracy", "--meta_reward applies to --mode rema only")
    need(args.meta_reward != "consistency" or (args.reas_samples_per_plan or args.num_generations) >= 2,
         "--meta_reward consistency needs --reas_samples_per_plan >= 2")
    need(0 <= f.eps_min <= f.eps_max <= 1, "need 0 <= --prompt_filter.eps_min <= --prompt_filter.eps_max <= 1")
    need(not (args.schedule == "switch" and args.filter),
         "--schedule switch follows the official code, which has no prompt filtering: add --no-filter")


if __name__ == "__main__":
    try:
        main(parse_args())
    except DataError as error:  # a bad data file: say which file, line and field, without a traceback
        raise SystemExit(f"rema_single.py: data error: {error}")
