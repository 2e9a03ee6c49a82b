"""The task behind one object: what a question looks like to each agent, how an answer is scored, what the answer
format is, and what counts as a leaked answer. Two tasks, one interface:

- `MathTask`: questions with a short gold answer; correctness by the grader (utils/grading.py), the format is a
  `\\boxed{}` answer, and a plan leaks if it boxes an answer (paper App. C.2).
- `JudgeTask`: pair ranking (LLM-as-a-Judge, paper Tables 1b / 2); correctness is the verdict `[[A]]` / `[[B]]`
  against the label, the format is exactly one verdict, and a plan leaks if it states a verdict.

The training scripts and eval.py build prompts and score answers only through these methods, so a new task is one
new class. `load` reads a run's train and held-out sets (`utils/data.py`, `utils/judge_data.py`).
"""

from __future__ import annotations

from utils import prompts
from utils.data import load_examples
from utils.grading import extract_boxed, has_boxed, parse_verdict, states_verdict
from utils.judge_data import load_judge_train_eval


class MathTask:
    name = "math"
    multiturn_reas_system = prompts.MULTITURN_REAS_SYSTEM  # the RA is asked for a boxed answer

    def __init__(self, tokenizer=None, grader=None, one_shot: bool = False):
        """one_shot: a worked example before each question in the answering agents' single-turn prompts (the RA,
        VRP, MRP; prompts.ONE_SHOT; the cpu preset)."""
        if one_shot and self.name != "math":
            raise ValueError(f"--one_shot is a math demonstration; the {self.name} task has none")
        self.tokenizer, self.grader, self.one_shot = tokenizer, grader, one_shot

    # ---- prompts, as token ids ending with the generation prompt ----
    def render(self, messages: list[dict]) -> list[int]:
        return prompts.render(self.tokenizer, messages)

    def meta_prompt(self, item: dict) -> list[int]:
        return self.render(prompts.meta_messages(item["question"]))  # (no worked example: how to plan is learned)

    def reas_prompt(self, item: dict, plan: str) -> list[int]:
        return self.render(prompts.reas_messages(item["question"], plan, self.one_shot))

    def single_prompt(self, item: dict, mode: str) -> list[int]:
        """The one agent of the VRP (chain of thought) or MRP (plan then solve) baseline."""
        return self.render((prompts.vrp_messages if mode == "vrp" else prompts.mrp_messages)(item["question"], self.one_shot))

    def conversation(self, item: dict) -> str:
        """The question a multi-turn conversation is about."""
        return item["question"]

    # ---- answers ----
    def score(self, texts: list[str], items: list[dict]) -> list[float]:
        """1.0 for a correct answer, else 0.0 (the grader never raises; a timeout scores 0)."""
        return self.grader.grade(texts, [it["answer"] for it in items])

    def in_format(self, text: str) -> bool:
        return has_boxed(text)

    def answer(self, text: str) -> str | None:
        """The answer a reply gives (the last box), for the consistency reward; None if it gives none."""
        return extract_boxed(text)

    def leaks(self, plan: str) -> bool:
        return has_boxed(plan)

    # ---- data ----
    def load(self, args) -> tuple[list[dict], list[dict]]:
        """(train set, held-out set) of rows {question, answer, ...}; 'arithmetic' is the built-in task, whose split
        is drawn with --arithmetic.seed (not --seed, so every run shares one held-out set)."""
        data = args.data
        common = dict(question_field=data.question_field, answer_field=data.answer_field, seed=args.arithmetic.seed,
                      arithmetic=args.arithmetic)
        train = load_examples(data.train_dataset, split=data.train_split, **common)
        held_out = load_examples(data.eval_dataset, split=data.eval_split, limit=data.eval_limit, **common)
        return train, held_out


class JudgeTask(MathTask):
    name = "judge"
    multiturn_reas_system = prompts.MULTITURN_JUDGE_REAS_SYSTEM  # the RA is asked for a verdict

    def meta_prompt(self, item: dict) -> list[int]:
        return self.render(prompts.judge_meta_messages(item["question"]))  # the plan is written without the responses

    def reas_prompt(self, item: dict, plan: str) -> list[int]:
        return self.render(prompts.judge_reas_messages(item["question"], item["response_A"], item["response_B"], plan))

    def single_prompt(self, item: dict, mode: str) -> list[int]:
        build = prompts.judge_vrp_messages if mode == "vrp" else prompts.judge_mrp_messages
        return self.render(build(item["question"], item["response_A"], item["response_B"]))

    def conversation(self, item: dict) -> str:
        return prompts.judge_pair_text(item["question"], item["response_A"], item["response_B"])

    def score(self, texts: list[str], items: list[dict]) -> list[float]:
        return [float(parse_verdict(t) == it["answer"]) for t, it in zip(texts, items)]

    def in_format(self, text: str) -> bool:
        return parse_verdict(text) is not None

    def answer(self, text: str) -> str | None:
        return parse_verdict(text)

    def leaks(self, plan: str) -> bool:
        return states_verdict(plan)

    def load(self, args) -> tuple[list[dict], list[dict]]:
        """Items {question, response_A, response_B, answer: "A" | "B"}. The sources: 'arithmetic' (built-in pairs, both
        orders), RewardBench (split here, by the one split definition of --judge.*), or a file of items (a split
        written by `python -m utils.judge_data`, or JudgeBench). Whatever the sources, the held-out set must come from
        the same split and share no instruction (strict) or item (loose) with the train set: a leak stops the run."""
        judge, data = args.judge, args.data
        return load_judge_train_eval(data.train_dataset, None if data.eval_dataset == "arithmetic" else data.eval_dataset,
                                     mode=judge.split, train_size=judge.train_size, test_size=judge.test_size,
                                     split_seed=judge.split_seed, eval_limit=data.eval_limit, arithmetic=args.arithmetic,
                                     max_error=judge.max_error)


TASKS = {"math": MathTask, "judge": JudgeTask}
