"""Multi-turn ReMA: a meta-thinking agent and a reasoning agent take turns on one conversation (paper Sec. 3.2.2).

    m_t ~ pi(. | S_h, x, m_1, y_1, ..., y_{t-1})      the meta-thinking agent (MTA) says what to do next
    y_t ~ pi(. | S_l, x, m_1, y_1, ..., m_t)          the reasoning agent (RA) does it
until the MTA writes [FINISH]; the RA then answers once more and its last message is graded.

Shared parameters (the paper's multi-turn setup): one model plays both agents, told apart by two system prompts,
and each trajectory gives two training sequences, the conversation as each agent saw it, trained on that agent's
own turns. Reward (docs/algorithm.md §10): both agents get the correctness of the RA's final answer; with
`mask_unfinished_reward` it is 0 unless the MTA finished the conversation itself. Advantages (§11): GRPO over the
G trajectories of each question (`--advantage_estimator`: also RLOO or REINFORCE++, as in rema_single.py). Loss
(§12): PPO with the turn-level ratio of Eq. 13, one ratio per turn, clipped per turn:
    rho_{s,t} = exp(min(mean_{j in turn} log(pi/pi_old)_j, L))      (official code; Eq. 13's arithmetic mean: option)
    l_{s,t}   = max(-A rho, -A clip(rho, 1-eps, 1+eps)),  and min(l, -A c) when A < 0 (dual clip)
    J         = mean over sequences s of the mean over their turns t of l_{s,t}                          (Eq. 12)
`--no-param_sharing` gives each agent its own parameters and trains one of them at a time, switching every
`switch_freq` steps (the Fig. 6 ablation). `--preset paper-qwen2.5-7b` runs the paper's configuration (App. D.2).

Dimensions: B questions per step (global), G = num_generations trajectories per question, T turns, N sequences on
this rank, P prompt tokens, C tokens after the prompt, V vocabulary.

Departures from the paper / official code, all deliberate:
 1. Training sequences are the token ids the agents sampled (docs/algorithm.md §15, items 6-7): a turn is trained
    on exactly what was sampled, including its end-of-turn token when it sampled one, and never on an end-of-turn
    token it did not sample (the official code appends one after [FINISH] and after text it stripped).
 2. The RA's own view keeps the [FINISH] tokens it sampled (they are its sampled ids); the MTA sees the RA's text
    with [FINISH] removed and the final answer is graded without it, as in the official code.
 3. A question whose first prompt exceeds max_context_length ends with reason context_exceeded and reward 0
    instead of stopping the run (official: an error).
 4. agg_mode=token with clip_mode=turn weights each turn's loss by its token count (official: an error), and a
    sequence without trained tokens adds 0 to every mean instead of NaN (docs/algorithm.md §15, items 9-10).
 5. The separate-parameters schedule switches every switch_freq steps from step 0 (official: a 9-step first block).
 6. No KL term and no entropy bonus: the paper's multi-turn runs use neither (beta = 0).
 7. With `--backend vllm` the loss is weighted by the truncated importance ratio pi_old / pi_vLLM (TRL and verl do
    the same; utils/sampling.py): the engine's bf16 kernels sample from a slightly different policy than pi_old.
 8. CPU-sized defaults: arithmetic task, SmolLM2-135M, 8 questions x 3 trajectories per step for 10 steps, 2
    turns of 32 tokens, one optimizer step per rollout, learning rate 4e-5, temperature 0.7, evaluation at the start
    and the end only, no gradient checkpointing, and one example exchange in the MTA's prompt (`--one_shot`: its
    instruction ends with [FINISH]), which stands in for the SFT stage the paper's multi-turn RL starts from (the
    untrained model never writes [FINISH] without it). The RA gets no example: it starts with long answers, most cut
    at 32 tokens, and learns by RL to answer within its turn. The reward mask and the stop on truncation are the
    paper's. The paper's value is in the docstring of every flag; `--preset paper-qwen2.5-7b` sets them all.
 9. With separate parameters each agent's AdamW state persists across the switches (not stated in the paper).
"""

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

import torch
from accelerate.utils import gather_object

from utils import prompts
from utils.batch import collate, select, update_sizes
from utils.config import (Annotated, DataArgs, Flat, GenerationArgs, GradingArgs, JudgeArgs, LoraArgs, ModelArgs,
                          OptimizerArgs, RunArgs, VLLMArgs, WandbArgs, arithmetic_default, cli)
from utils.data import ArithmeticConfig, DataError
from utils.distributed import clip_grad_norm, grad_sync, make_accelerator, shard
from utils.logprobs import completion_logprobs, old_and_ref_logprobs
from utils.presets import multi_turn
from utils.run import Run, multi_turn_header
from utils.sampling import importance_weights
from utils.tracking import multi_turn_step_metrics
from utils.validate import TWIN_RANGES, above, at_least, check_ranges, check_twin_options, requirement

ROLES = ["meta_thinking", "reasoning"]  # the MTA always speaks first
PREFIX = {"meta_thinking": "meta", "reasoning": "reas"}
# finish reasons (docs/algorithm.md §8; the official `{role}_turn_finished` codes)
NORMAL, MAX_TURNS, CONTEXT_EXCEEDED, TRUNCATED = 0, 1, 2, 3
REASONS = {NORMAL: "normal", MAX_TURNS: "max_turns", CONTEXT_EXCEEDED: "context_exceeded", TRUNCATED: "truncated"}


@dataclass
class Args:
    preset: str = "cpu"
    """named configuration whose values replace these defaults (utils/presets.py, listed by --help); flags override it"""
    # ---- method ----
    param_sharing: bool = True
    """one model plays both agents (paper); --no-param_sharing: separate parameters, one agent trained at a time (Fig. 6)"""
    switch_freq: int = 10
    """--no-param_sharing: steps per block of one agent, MTA first (official default 10)"""
    total_steps: int = 10
    """training steps (paper: 500)"""
    mask_unfinished_reward: bool = True
    """reward 0 unless the MTA ended the conversation with [FINISH] (the paper's format reward); --no-: the reward
    of every conversation (a model that never writes [FINISH], e.g. without --one_shot or SFT, gets only 0s with it)"""
    one_shot: bool = True
    """one example exchange (7 + 5) before the question in the MTA's opening messages, its instruction ending with
    [FINISH] (not in the paper, whose model learns the protocol by SFT). Unless given, on for --preset cpu on the math
    task, see FOLLOWS"""
    reas_one_shot: bool = False
    """an example exchange for the RA too, its answer boxed (the cpu preset before it let the RA learn its answer
    format by RL: with it the untrained RA starts higher and gains less)"""
    stop_when_truncated: bool = True
    """end a trajectory when a turn hits max_completion_length (paper); with the reward mask it then gets 0"""
    # ---- rollout ----
    rollout_batch_size: int = 8
    """B: questions per training step over all processes (paper: 128)"""
    num_generations: int = 3
    """G: trajectories per question, the GRPO group (paper: 16)"""
    max_turns: int = 2
    """turns per trajectory; a turn is one MTA message and one RA message (paper: 30)"""
    max_completion_length: int = 32
    """max new tokens of one turn of either agent (paper: 512)"""
    max_context_length: int = 512
    """max tokens of the conversation an agent is prompted with; longer ends the trajectory (paper: 4096)"""
    temperature: float = 0.7
    """rollout sampling temperature (paper 1.0; at 1.0 the 135M default answers 3% of a + b right over two turns,
    at 0.7 19%); evaluation is greedy"""
    # ---- optimisation ----
    advantage_estimator: str = "grpo"
    """one of ESTIMATORS: grpo (group mean / std; paper), rloo (leave-one-out), reinforce_pp (batch-whitened rewards)"""
    scale_rewards: bool = True
    """grpo: divide by the group std (Dr. GRPO turns this off)"""
    clip_mode: Literal["turn", "token"] = "turn"
    """turn: one ratio per turn (paper's Turn-Ratio); token: one ratio per token (Fig. 6 Token-Ratio ablation)"""
    ratio_form: Literal["geometric", "arithmetic"] = "geometric"
    """clip_mode=turn: geometric = exp(min(mean token log-ratio, L)) (official code); arithmetic = mean over the turn
    of exp(min(token log-ratio, L)): Eq. 13's mean of token ratios with each token's ratio capped at e^L first, so it
    is Eq. 13 exactly only while every token's log-ratio is <= --log_ratio_cap (raise the cap for the pure form)"""
    agg_mode: Literal["trajectory", "turn", "token"] = "trajectory"
    """loss mean: over sequences of their turn means (Eq. 12), over all turns, or over all tokens"""
    epsilon: float = 0.2
    """PPO clip range (paper 0.2)"""
    epsilon_high: float | None = None
    """upper clip range (DAPO clip-higher); None: epsilon"""
    dual_clip: float | None = 3.0
    """dual clip c: the loss of a negative-advantage unit is capped at -A c (official 3.0); None: off"""
    log_ratio_cap: float = 3.0
    """L: token log-ratios are capped at L before exponentiating (official 3.0)"""
    num_iterations: int = 1
    """passes over each rollout (paper / official ppo_epochs: 1)"""
    mini_batch_size: int | None = None
    """sequences per optimizer step over all processes (paper: 4 steps per rollout, 1024 of 128 x 16 x 2 sequences);
    None: the whole rollout, one step (the official example script: the ratio stays 1)"""
    micro_batch_size: int = 8
    """sequences per forward/backward on each process (gradient accumulation up to the mini-batch)"""
    optim: Annotated[OptimizerArgs, Flat] = field(
        default_factory=lambda: OptimizerArgs(learning_rate=4e-5, weight_decay=0.01))
    """the optimizer (AdamW, constant learning rate; the cpu preset's 4e-5, paper 1e-6) and the guard against non-finite
    steps"""
    # ---- plumbing shared with rema_single.py (utils/config.py) ----
    lm: Annotated[ModelArgs, Flat] = field(default_factory=ModelArgs)
    """the model and how it is trained"""
    run: Annotated[RunArgs, Flat] = field(default_factory=lambda: RunArgs(exp_name="rema_multiturn"))
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
    sequences: int  # trained per step: one per (trajectory, trained role)
    steps_per_rollout: int  # optimizer steps per PPO epoch on them (the header's count)
    recompute_old: bool  # pi_old recomputed before every update (vLLM samples need it; more than one optimizer step
    # per rollout also needs it: decided per update from the batch, see update_sizes)
    eps_high: float  # upper clip range
    is_mode: str  # importance weighting against the sampler: "none" unless generation runs on vLLM


def derive(args: Args, accelerator) -> Derived:
    validate(args, accelerator)
    vllm = args.generation.backend == "vllm"
    sequences = args.rollout_batch_size * args.num_generations * len(trained_roles(0, args))
    _, steps = update_sizes(sequences, args, accelerator.num_processes)
    return Derived(sequences=sequences, steps_per_rollout=steps, recompute_old=args.num_iterations > 1 or vllm,
                   eps_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
                   is_mode=args.vllm.importance_sampling_mode if vllm else "none")


# ---- ROLLOUT (docs/algorithm.md §8) and the training sequences it yields (§9) ---------------------------------------
@dataclass
class Turn:
    role: str
    text: str  # what the other agent reads (decoded, stripped; the RA's without [FINISH])
    num_tokens: int
    truncated: bool


@dataclass
class Trajectory:
    question: str
    answer: str
    turns: list[Turn] = field(default_factory=list)  # in speaking order: m_1, y_1, m_2, y_2, ...
    ids: dict[str, list[int]] = field(default_factory=dict)  # role -> its view of the conversation, as token ids
    turn_ids: dict[str, list[int]] = field(default_factory=dict)  # role -> per token: own turn index t, or -1
    sample_logp: dict[str, list[float]] = field(default_factory=dict)  # vLLM: role -> per token: sampler log-prob
    reason: int | None = None  # None while the conversation runs, then one of REASONS
    key: tuple = ()  # identifies the trajectory in the run (step, question, sample): keys its random streams
    correct: float = 0.0
    reward: float = 0.0

    @property
    def final_response(self) -> str:
        """The RA's last message, or "" if the trajectory ended before the RA answered (the official dummy turn)."""
        return self.turns[-1].text if self.turns and self.turns[-1].role == "reasoning" else ""

    @property
    def num_turns(self) -> int:
        return sum(t.role == "meta_thinking" for t in self.turns)


def multi_turn_rollout(items: list[dict], generate_fn, tokenizer, max_turns: int, max_context_length: int,
                       stop_when_truncated: bool, reas_system: str = prompts.MULTITURN_REAS_SYSTEM,
                       one_shot: bool = False, reas_one_shot: bool | None = None) -> list[Trajectory]:
    """Run all conversations turn by turn; each agent's turn is one batched generate_fn(role, prompt ids, keys) call
    over every live conversation (keys: (the item's "key", turn index) of each, to seed its sample). A conversation
    ends normally when the MTA has written [FINISH] and the RA has answered; otherwise when a prompt would exceed
    max_context_length, when a turn is truncated (if stop_when_truncated), or after max_turns turns. reas_system:
    the RA's system prompt (the judge task asks for a verdict, not a box); one_shot: the MTA's opening messages start
    with an example exchange (prompts.ONE_SHOT; the cpu preset), and the RA's too if reas_one_shot (None: one_shot)."""
    reas_one_shot = one_shot if reas_one_shot is None else reas_one_shot
    pieces = prompts.ChatPieces.from_tokenizer(tokenizer)
    closing = tokenizer(pieces.closing, add_special_tokens=False)["input_ids"]  # e.g. [<|im_end|>, "\n"]

    def user_turn(text: str) -> list[int]:  # the other agent's message, as a user turn, then the generation prompt
        return tokenizer(pieces.user_prefix + text + pieces.user_suffix, add_special_tokens=False)["input_ids"]

    trajs = [Trajectory(it["question"], it["answer"], key=tuple(it.get("key", ()))) for it in items]
    for t in range(max_turns):
        for role in ROLES:
            live, contexts = [], []
            for tr in trajs:
                if tr.reason is not None:
                    continue
                if role not in tr.ids:  # this agent's first turn: render its opening messages (docs/algorithm.md §1)
                    messages = (prompts.multiturn_meta_messages(tr.question, one_shot) if role == "meta_thinking"
                                else prompts.multiturn_reas_messages(tr.question, tr.turns[-1].text, reas_system,
                                                                     reas_one_shot))
                    context = prompts.render(tokenizer, messages)
                else:  # its own sampled ids so far, then the other agent's last message as a user turn
                    context = tr.ids[role] + user_turn(tr.turns[-1].text)
                if len(context) > max_context_length:
                    tr.reason = CONTEXT_EXCEEDED
                    continue
                live.append(tr)
                contexts.append(context)
            completions = generate_fn(role, contexts, [tr.key + (t,) for tr in live])
            assert len(completions) == len(live)
            for tr, context, c in zip(live, contexts, completions):
                # the sampled ids are trained as turn t; the template's closing is added, untrained, after them
                # (minus its end-of-turn token if the agent sampled that token itself)
                tail = closing[1:] if c.ids and c.ids[-1] == closing[0] else closing
                before = tr.turn_ids.get(role, [])
                tr.turn_ids[role] = before + [-1] * (len(context) - len(before)) + [t] * len(c.ids) + [-1] * len(tail)
                tr.ids[role] = context + c.ids + tail
                if c.logprobs is not None:  # vLLM's log-probs, aligned with ids (NaN where nothing was sampled)
                    lp = tr.sample_logp.get(role, [])
                    tr.sample_logp[role] = lp + [math.nan] * (len(context) - len(lp)) + c.logprobs + [math.nan] * len(tail)
                text = tokenizer.decode(c.ids, skip_special_tokens=True).strip()
                if role == "reasoning":
                    text = text.replace(prompts.FINISH_FLAG, "").rstrip()
                tr.turns.append(Turn(role, text, len(c.ids), c.truncated))
                if role == "reasoning" and prompts.FINISH_FLAG in tr.turns[-2].text:
                    tr.reason = NORMAL  # the MTA said [FINISH] and the RA has answered
                if stop_when_truncated and c.truncated:
                    tr.reason = TRUNCATED  # overrides a normal finish
    for tr in trajs:
        if tr.reason is None:
            tr.reason = MAX_TURNS if max_turns > 1 else NORMAL
    return trajs


def role_sequence(tr: Trajectory, role: str, pad_id: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, ids after the prompt, their turn indices): the prompt is everything before the role's first
    turn and the sequence ends with its last sampled token. An agent that never spoke gives an empty sequence."""
    turns = tr.turn_ids.get(role, [])
    trained = [i for i, k in enumerate(turns) if k >= 0]
    if not trained:
        return [pad_id], [], []
    start, end = trained[0], trained[-1] + 1
    ids = tr.ids[role]
    return ids[:start], ids[start:end], turns[start:end]


def rollout(items, agent_of, sampler, task, args, temperature: float, desc: str) -> list[Trajectory]:
    """Conversations on `items` (G consecutive copies of a question per group in training), with their rewards."""
    def generate_fn(role: str, prompt_ids: list[list[int]], keys: list[tuple]):
        # each turn samples from its own stream, seeded by (trajectory, turn, role); greedy decoding needs none
        return sampler(agent_of[role], prompt_ids, temperature, f"{desc} {role}", [k + (role,) for k in keys])[0]

    trajs = multi_turn_rollout([it | {"question": task.conversation(it)} for it in items], generate_fn,
                               sampler.tokenizer, args.max_turns, args.max_context_length, args.stop_when_truncated,
                               task.multiturn_reas_system, task.one_shot, args.reas_one_shot)
    # ---- REWARD (docs/algorithm.md §10): the RA's final answer (judge: its verdict), masked unless the MTA finished
    with sampler.timed("rewards"):
        correct = task.score([tr.final_response for tr in trajs], [{"answer": tr.answer} for tr in trajs])
    for tr, c in zip(trajs, correct):
        tr.correct, tr.reward = c, trajectory_reward(c, tr.reason, args.mask_unfinished_reward)
    return trajs


def sequence_sampler_logprobs(seqs, trajs_by_seq, mask: torch.Tensor) -> torch.Tensor | None:
    """vLLM's log-probs of each role-sequence's tokens after its prompt, (N, C) like the trainer's; None with HF."""
    if not all(role in tr.sample_logp or not s[1] for s, (role, tr) in zip(seqs, trajs_by_seq)):
        return None
    sampled = torch.zeros_like(mask)
    for i, (s, (role, tr)) in enumerate(zip(seqs, trajs_by_seq)):
        lp = tr.sample_logp.get(role, [])[len(s[0]) : len(s[0]) + len(s[1])]
        sampled[i, : len(lp)] = torch.tensor(lp, device=mask.device).nan_to_num(0.0)
    return sampled


# ---- REWARD (docs/algorithm.md §10) --------------------------------------------------------------------------------
def trajectory_reward(correct: float, reason: int, mask_unfinished_reward: bool) -> float:
    """Both agents get the correctness of the RA's final answer; with the mask, 0 unless the MTA finished."""
    return correct if (not mask_unfinished_reward or reason == NORMAL) else 0.0


# ---- ADVANTAGES (docs/algorithm.md §11): each estimator maps the trajectories' rewards (N,), groups of G consecutive, --
# to one advantage per trajectory (N,), which both agents' sequences of the trajectory share (no KL term: item 6)
def reinforce_pp_advantages(rewards, group_size: int, scale_rewards: bool = True, accelerator=None) -> torch.Tensor:
    """REINFORCE++ without its KL term: the rewards whitened over the global batch's trajectories, as OpenRLHF:
    (R - mean) / sqrt(max(var, 1e-8)) (every token's return is R: gamma = 1, no KL)."""
    stats = torch.stack([rewards.sum(), (rewards**2).sum(), torch.tensor(float(len(rewards)), device=rewards.device)])
    total, total_sq, count = (accelerator.reduce(stats, reduction="sum") if accelerator else stats).tolist()
    mean = total / count
    return (rewards - mean) / math.sqrt(max(total_sq / count - mean**2, 1e-8))


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True, accelerator=None) -> torch.Tensor:
    """A_i = (R_i - mean_g) / (std_g + 1e-6), unbiased std (official); a group of one gets A = R (mean 0, std 1)."""
    if group_size == 1:
        return rewards.clone()
    r = rewards.view(-1, group_size)  # (N/G, G)
    adv = r - r.mean(-1, keepdim=True)
    if scale_rewards:
        adv = adv / (r.std(-1, keepdim=True) + 1e-6)
    return adv.reshape(-1)


def rloo_advantages(rewards, group_size: int, scale_rewards: bool = True, accelerator=None) -> torch.Tensor:
    """RLOO: A_i = R_i - mean_{j != i} R_j over the G trajectories of the question."""
    r = rewards.view(-1, group_size)  # (N/G, G)
    return (r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)).reshape(-1)


class Estimator(NamedTuple):
    fn: Callable
    needs_group: bool  # compares the G trajectories of a question: needs num_generations >= 2


ESTIMATORS = {  # --advantage_estimator picks one
    "reinforce_pp": Estimator(reinforce_pp_advantages, needs_group=False),
    "grpo": Estimator(grpo_advantages, needs_group=False),  # a group of one: A = R (official)
    "rloo": Estimator(rloo_advantages, needs_group=True),
}


# ---- POLICY LOSS: the turn-level ratio (paper Eq. 12-13, docs/algorithm.md §12), weighted against the sampler ------
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


def per_turn_sum(x: torch.Tensor, turn_ids: torch.Tensor, num_turns: int) -> torch.Tensor:
    """(n, C) token values -> (n, num_turns): the sum over the tokens of each turn (tokens with turn id -1 ignored)."""
    mask = (turn_ids >= 0).to(x.dtype)
    out = torch.zeros(x.shape[0], num_turns, dtype=x.dtype, device=x.device)
    return out.scatter_add(1, turn_ids.clamp(min=0), x * mask)


def turn_policy_loss(logp, old_logp, advantages, turn_ids, *, clip_mode: str, ratio_form: str, agg_mode: str,
                     eps_low: float, eps_high: float, dual_clip: float, log_ratio_cap: float, is_weight=None):
    """The sum over this micro-batch of the units agg_mode averages (divide by loss_normaliser of the mini-batch):
        trajectory: per sequence, the mean of its turn (or token) losses;  turn: each turn's loss (clip_mode=turn)
        or mean token loss (clip_mode=token);  token: each token's loss (a turn's loss counts once per token).
    logp, old_logp, turn_ids, is_weight (importance weights against the sampler, a turn's weight being the mean of
    its tokens'; None: 1): (n, C); advantages: (n,). Returns (loss sum, counts of clipped units, units)."""
    mask = (turn_ids >= 0).float()  # (n, C) trained tokens
    T = int(turn_ids.max().clamp(min=0)) + 1
    log_ratio = (logp - old_logp) * mask  # (n, C)
    adv_tok = advantages[:, None].expand_as(logp)  # (n, C)
    tokens = per_turn_sum(torch.ones_like(logp), turn_ids, T)  # (n, T): |J_{s,t}|
    valid = (tokens > 0).float()  # (n, T): turns that exist
    size = tokens.clamp(min=1)
    if clip_mode == "turn":
        if ratio_form == "geometric":  # rho = exp(min(mean_j lr_j, L))
            ratio = torch.exp(torch.clamp(per_turn_sum(log_ratio, turn_ids, T) / size, max=log_ratio_cap))
        else:  # Eq. 13 with capped tokens: rho = mean_j exp(min(lr_j, L))
            ratio = per_turn_sum(torch.exp(torch.clamp(log_ratio, max=log_ratio_cap)), turn_ids, T) / size
        adv = per_turn_sum(adv_tok, turn_ids, T) / size  # (n, T): the turn's mean advantage
        loss, low, high, dual = ppo_clip_loss(ratio, adv, eps_low, eps_high, dual_clip)  # (n, T)
        if is_weight is not None:
            loss = loss * per_turn_sum(is_weight, turn_ids, T) / size
        loss, units = loss * valid, valid
        if agg_mode == "trajectory":
            total = (loss.sum(-1) / valid.sum(-1).clamp(min=1)).sum()
        elif agg_mode == "turn":
            total = loss.sum()
        else:
            total = (loss * tokens).sum()
    else:  # token-level ratio
        ratio = torch.exp(torch.clamp(log_ratio, max=log_ratio_cap))  # (n, C)
        loss, low, high, dual = ppo_clip_loss(ratio, adv_tok, eps_low, eps_high, dual_clip)  # (n, C)
        if is_weight is not None:
            loss = loss * is_weight
        loss, units = loss * mask, mask
        if agg_mode == "trajectory":
            total = (loss.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        elif agg_mode == "turn":
            total = (per_turn_sum(loss, turn_ids, T) / size).sum()
        else:
            total = loss.sum()
    counts = {k: (v.float() * units).sum() for k, v in dict(clip_low=low, clip_high=high, clip_dual=dual).items()}
    return total, counts | {"units": units.sum()}


def loss_normaliser(turn_ids: torch.Tensor, agg_mode: str) -> float:
    """The denominator of agg_mode's mean over (n, C) turn ids: sequences, distinct (sequence, turn) pairs, or tokens."""
    if agg_mode == "trajectory":
        return float(turn_ids.shape[0])
    if agg_mode == "token":
        return float((turn_ids >= 0).sum())
    T = int(turn_ids.max().clamp(min=0)) + 1
    return float((per_turn_sum(torch.ones(turn_ids.shape), turn_ids.cpu(), T) > 0).sum())


def micro_batch_loss(logp, entropy, micro: dict, args, d, norm):
    """The loss of one micro-batch (its share of the mini-batch mean) and its statistics."""
    m = (micro["turn_ids"] >= 0).float()
    old_logp = micro["old_logp"] if "old_logp" in micro else logp.detach()
    total, counts = turn_policy_loss(logp, old_logp, micro["advantages"], micro["turn_ids"], clip_mode=args.clip_mode,
                                     ratio_form=args.ratio_form, agg_mode=args.agg_mode, eps_low=args.epsilon,
                                     eps_high=d.eps_high, dual_clip=args.dual_clip, log_ratio_cap=args.log_ratio_cap,
                                     is_weight=micro.get("is_weight"))
    loss = total / norm
    stats = dict(loss=loss.item(), entropy=(entropy * m).sum().item(), tokens=m.sum().item(),
                 log_ratio=((logp.detach() - old_logp).abs() * m).sum().item())
    return loss, stats | {k: v.item() for k, v in counts.items()}


# ---- UPDATE: PPO epochs over mini- and micro-batches (pi_old and pi_ref: utils/logprobs.old_and_ref_logprobs) ----
def ppo_update(agent, batch: dict, args, d: Derived, mini_batch: int, accelerator, autocast, guard, step: int) -> dict:
    """num_iterations PPO epochs over mini-batches of this process's sequences (mini_batch each: update_sizes),
    gradient accumulation over micro-batches of similar lengths. Returns sums of the loss statistics over the applied
    optimizer steps."""
    turn_ids, world = batch["turn_ids"], accelerator.num_processes
    seq_len = batch["attention_mask"].sum(-1)  # (N,): micro-batches are cut from sequences of similar length
    sums = defaultdict(float)
    agent.model.train()
    for _ in range(args.num_iterations):
        for mb in torch.randperm(len(turn_ids), device=turn_ids.device).split(mini_batch):
            norm = torch.tensor(loss_normaliser(turn_ids[mb], args.agg_mode), device=turn_ids.device)
            norm = accelerator.reduce(norm, reduction="sum").clamp(min=1) / world  # the global denominator, per process
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


def learn(agent, roles: list[str], trajs: list, args, d: Derived, sampler, tokenizer, accelerator, autocast, guard,
          step: int) -> dict:
    """Train `agent` on the conversations: one sequence per (trained role, trajectory), that agent's view with its
    own turns labelled; pi_old, the advantages, then the PPO update. The update's sizes come from this batch
    (update_sizes). Returns the step's metrics."""
    world = accelerator.num_processes
    by_seq = [(role, tr) for role in roles for tr in trajs]
    seqs = [role_sequence(tr, role, tokenizer.pad_token_id) for role, tr in by_seq]
    batch = collate([s[0] for s in seqs], [s[1] for s in seqs], tokenizer.pad_token_id, accelerator.device,
                    turn_ids=[s[2] for s in seqs])
    mask = (batch["turn_ids"] >= 0).float()  # (N, C) trained tokens
    rewards = torch.tensor([tr.reward for tr in trajs], dtype=torch.float32, device=accelerator.device)  # (B_local * G,)

    # ---- OLD LOG-PROBS, and with vLLM the importance weights against its samples ----
    agent.activate()  # LoRA: this agent's adapter on (the rollout may have left another's on)
    mini_batch, steps = update_sizes(len(mask) * world, args, world)  # from the batch that is trained
    with sampler.timed("logprobs"):
        old_and_ref_logprobs(agent, batch, d.recompute_old or steps * args.num_iterations > 1, False, args, autocast)
    sampled = sequence_sampler_logprobs(seqs, by_seq, mask)  # (N, C) vLLM's log-probs; None with HF
    gap, is_stats = sampler.before_update(agent, batch.get("old_logp"), sampled, mask), {}  # vLLM: sampler vs pi_old
    if d.is_mode != "none" and sampled is not None:
        batch["is_weight"], is_stats = importance_weights(batch["old_logp"], sampled, mask, d.is_mode,
                                                          args.vllm.importance_sampling_cap)

    # ---- ADVANTAGES, one per trajectory, shared by its sequences (both agents'): (N,) ----
    batch["advantages"] = ESTIMATORS[args.advantage_estimator].fn(
        rewards, args.num_generations, args.scale_rewards, accelerator).repeat(len(roles))

    # ---- UPDATE: PPO epochs over mini-batches, gradient accumulation over micro-batches ----
    with sampler.timed("update"):
        sums = ppo_update(agent, batch, args, d, mini_batch, accelerator, autocast, guard, step)
    metrics = rollout_metrics(trajs, len(trajs), "rollout")
    metrics |= multi_turn_step_metrics("train" if args.param_sharing else f"train/{PREFIX[roles[0]]}", rewards, sums, is_stats,
                                       args.num_generations, agent.optimizer.param_groups[0]["lr"], accelerator)
    return metrics | gap | sampler.after_update(agent)  # vLLM: the new weights pushed, and checked


# ---- SCHEDULE: total_steps steps over shuffled epochs; separate parameters switch agents every switch_freq ----------
def trained_roles(step: int, args: Args) -> list[str]:
    """The agents trained at `step`: both (shared parameters), or one block of switch_freq steps each, MTA first."""
    return ROLES if args.param_sharing else [ROLES[(step // args.switch_freq) % len(ROLES)]]


# ---- EVALUATION: greedy multi-turn conversations on the held-out set ------------------------------------------------
def rollout_metrics(trajs: list[Trajectory], n_real: int, prefix: str) -> dict:
    """Means over the trajectories of every process (the first n_real of this process's list are real)."""
    rows = gather_object([(tr.reward, tr.correct, tr.num_turns, tr.reason,
                           {r: [(t.num_tokens, t.truncated) for t in tr.turns if t.role == r] for r in ROLES})
                          for tr in trajs[:n_real]])
    n = len(rows)
    out = {f"{prefix}/reward": sum(r[0] for r in rows) / n, f"{prefix}/accuracy": sum(r[1] for r in rows) / n,
           f"{prefix}/mean_turns": sum(r[2] for r in rows) / n, f"{prefix}/questions": n}
    out |= {f"{prefix}/finish/{name}": sum(r[3] == code for r in rows) / n for code, name in REASONS.items()}
    for role in ROLES:
        turns = [t for r in rows for t in r[4][role]]
        out[f"{prefix}/{PREFIX[role]}/turn_length"] = sum(t[0] for t in turns) / max(len(turns), 1)
        out[f"{prefix}/{PREFIX[role]}/clipped_ratio"] = sum(t[1] for t in turns) / max(len(turns), 1)
    return out


def evaluate(eval_set, agent_of, sampler, task, args, accelerator) -> dict:
    mine, n_real = shard(eval_set, accelerator.process_index, accelerator.num_processes)
    return rollout_metrics(rollout(mine, agent_of, sampler, task, args, 0.0, "eval"), n_real, "eval")


# ---- THE TRAINING LOOP ---------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    accelerator = make_accelerator(find_unused_parameters=args.lm.param_mode == "lora" and not args.param_sharing)
    d = derive(args, accelerator)  # every derived choice, decided once
    rank, world = accelerator.process_index, accelerator.num_processes
    names = ["policy"] if args.param_sharing else ROLES  # one shared policy, or one per agent
    run = Run(args, accelerator, "rema_multiturn.py", {n: args.max_completion_length for n in names},
              stop_strings=(prompts.FINISH_FLAG,),
              max_model_len=args.vllm.max_model_len or args.max_context_length + args.max_completion_length)
    agent_of = {role: run.agents["policy"] if args.param_sharing else run.agents[role] for role in ROLES}
    sampler, task, train_set, state, G = run.sampler, run.task, run.train_set, run.state, args.num_generations
    steps_per_epoch = len(train_set) // args.rollout_batch_size
    assert steps_per_epoch >= 1, f"the train set ({len(train_set)} rows) is smaller than --rollout_batch_size"
    run.start(multi_turn_header(args, d.sequences, d.steps_per_rollout * args.num_iterations), args.total_steps,
              lambda: evaluate(run.eval_set, agent_of, sampler, task, args, accelerator), "multiturn")

    with run.session():  # the end: the last evaluation and checkpoint; SIGTERM: the last step saved, exit 0
        for step in range(state["step"], args.total_steps):  # one step per batch, over shuffled epochs
            run.between_steps()  # the last completed step's evaluation and checkpoint, when due
            roles = trained_roles(step, args)
            agent = agent_of[roles[0]]  # shared parameters: the same agent for both roles
            epoch, k = divmod(step, steps_per_epoch)  # the k-th batch of this epoch's order
            perm = list(range(len(train_set)))
            random.Random(args.run.seed * 7919 + epoch).shuffle(perm)
            idx = perm[k * args.rollout_batch_size:(k + 1) * args.rollout_batch_size]
            # G trajectories per question, consecutive; the key seeds each trajectory's samples
            items = [train_set[i] | {"key": (step, i, g)} for i in idx[rank::world] for g in range(G)]
            t0 = run.step_began()

            # ---- ROLLOUT: conversations and rewards ----
            trajs = rollout(items, agent_of, sampler, task, args, args.temperature, "rollout")
            timing = run.rollout_done(t0)

            # ---- OLD LOG-PROBS -> ADVANTAGES -> UPDATE of the trained agent(s) on the conversations ----
            metrics = learn(agent, roles, trajs, args, d, sampler, run.tokenizer, accelerator, run.autocast, run.guard,
                            state["step"] + 1)

            # ---- METRICS ----
            metrics["train/agent"] = float(ROLES.index(roles[0])) if len(roles) == 1 else -1.0
            shows = [dict(question=tr.question, gold=tr.answer, finish=REASONS[tr.reason], reward=tr.reward,
                          conversation=[{t.role: t.text} for t in tr.turns]) for tr in trajs[::G]]
            if not run.step_done(metrics, t0, timing, shows,
                                 {"rollout/reward": metrics["rollout/reward"], "turns": metrics["rollout/mean_turns"]}):
                break


# ---- SETUP: validate the options, then decide every derived value once ---------------------------------------------
# the valid range of each numeric option of Args (the shared groups': utils/validate.py, SHARED), checked right after
# parsing (parse_args) and again by validate(): a bad value exits with status 2 and a message naming the flag
RANGES = TWIN_RANGES | {
    "max_turns": at_least(1), "max_completion_length": at_least(1), "max_context_length": at_least(1),
    "log_ratio_cap": above(0),
}

FOLLOWS = {  # options whose default follows other options, unless given on the command line (utils.config.cli)
    "one_shot": lambda args: args.preset == "cpu" and args.data.task == "math",  # the paper's prompts have none
}


def parse_args() -> Args:
    """The command line over its preset, every numeric option checked against its range before anything loads."""
    return check_ranges(cli(Args, multi_turn(), "rema_multiturn.py", FOLLOWS), RANGES, "rema_multiturn.py")


def validate(args: Args, accelerator) -> None:
    """The ranges, then the options that depend on each other or on the number of processes; a violation prints
    its message to stderr and exits with status 2."""
    check_ranges(args, RANGES, "rema_multiturn.py")
    need = requirement("rema_multiturn.py")
    check_twin_options(args, need, accelerator.num_processes, ESTIMATORS,
                       args.rollout_batch_size * args.num_generations * len(trained_roles(0, args)),  # one per role
                       "rollout_batch_size x num_generations x trained roles")
    need(not args.reas_one_shot or args.data.task == "math", "--reas_one_shot is a worked math example")
    need(args.clip_mode == "turn" or args.ratio_form == "geometric",
         "--ratio_form chooses how a turn's ratio is formed: it needs --clip_mode turn")


if __name__ == "__main__":
    try:
        main(parse_args())
    except DataError as error:  # a bad data file: say which file, line and field, without a traceback
        raise SystemExit(f"rema_multiturn.py: data error: {error}")
