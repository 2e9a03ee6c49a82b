"""Prompts: the single source of truth for training (rema_single.py, rema_multiturn.py) and evaluation (eval.py).

Strings follow the paper's appendix G and the official code's `prompt/math/` files (docs/algorithm.md §1):
- Single-turn system prompts are the official `prompt/math/single_turn_mamrp.py` strings, `.strip()`ed, except that
  the reasoning agent's prompt says `\\boxed{}` (paper, App. G.1.2) where the official code has a literal
  `\\boxed{{}}` because `.format` is never called.
- Single-turn user templates are the paper's App. G ones (the official code's `Question:/Instruction:` template
  is the multi-turn one).
- The MRP system prompt is only quoted in part in the paper ("...first task is to provide a high-level solution
  plan as an instruction. Then you need to follow the provided instructions precisely..."); the full string
  below is our reconstruction around that quote.
"""

from dataclasses import dataclass

# ---- single-turn ReMA (paper App. G.1) ----
META_SYSTEM = (
    "You are a math expert specialized in solving mathematical problems, you need to teach a weaker agent with "
    "minimal capability in math how to solve a problem step-by-step. \n"
    "Your task is to provide a high-level solution plan for the given problem, in order to guide a low-level math "
    "solving agent to solve the problem.\n"
    "You can not directly answer the question. You'll be punished if you include any answer in your response.\n"
    "You need to first think deeply in mind and output your final instruction."
)
REAS_SYSTEM = (
    "You are a math expert tasked with solving problems step by step. Follow the provided instructions precisely, "
    "showing all reasoning and intermediate steps.\n"
    "Present the final answer within \\boxed{}."
)
META_USER = "Here is the question:\n{question}"
REAS_USER = (
    "Here is the question and instructions:\n"
    "[Question]\n{question}\n[End of Question]\n"
    "[Provided Instruction]\n{plan}\n[End of Instruction]"
)

# ---- single-agent baselines ----
VRP_SYSTEM = "You are a math expert tasked with solving problems step by step. \nPresent the final answer within \\boxed{}."
MRP_SYSTEM = (
    "You are a math expert tasked with solving problems. Your first task is to provide a high-level solution plan "
    "as an instruction. Then you need to follow the provided instructions precisely, showing all reasoning and "
    "intermediate steps.\n"
    "Present the final answer within \\boxed{}."
)

# ---- multi-turn ReMA (official prompt/math/multi_turn_mamrp.py, not stripped) ----
FINISH_FLAG = "[FINISH]"
MULTITURN_META_SYSTEM = (
    "You are a meta-think agent that represents human high-level think process, when solving a question, you will "
    "have a discussion with human, each time you think about what to do next: e.g. \n"
    "- Exploring multiple angles and approaches\n"
    "- Breaking down the solution into clear steps\n"
    "- Continuously reflecting on intermediate results honestly and adapt your strategy as you progress\n"
    "- Backtracking when necessary\n"
    "- Requesting exploration of multiple solutions individually\n"
    "- Finally confirm the answer with the tag [FINISH]\n"
)
MULTITURN_REAS_SYSTEM = (
    "Please reason step by step follow the given instruction, when asked to finalize your answer, put your answer "
    "within \\boxed{}"
)


# ---- the CPU preset's one-shot demonstration (not in the paper) ----
# Zero-shot, SmolLM2-135M's reasoning agent boxes none of its greedy answers to `a + b`, so its first rollouts are
# all -1 (nothing to learn from). `--one_shot` (the `cpu` preset) puts a worked example before the question, as an
# earlier user / assistant turn, in the prompts of the agents that answer (the RA, VRP, MRP): it shows the answer's
# format. In single-turn ReMA the meta-thinking agent keeps the paper's prompt, so how to plan is left to RL. In
# multi-turn ReMA both agents see one example exchange (multiturn_*_messages): the paper's multi-turn RL starts from a
# model that learned the conversation protocol, [FINISH] included, by SFT, and the cpu preset has no SFT stage. The
# paper's prompts have no example.
ONE_SHOT = {"question": "What is 7 + 5?", "plan": "Add the two numbers: start from 7 and count up 5 more.",
            "solution": "7 + 5 = 12.\nThe answer is \\boxed{12}."}


def _exchange(user: str, reply: str, one_shot: bool) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}] if one_shot else []


def meta_messages(question: str) -> list[dict]:
    """What the meta-thinking agent sees in single-turn ReMA."""
    return [{"role": "system", "content": META_SYSTEM}, {"role": "user", "content": META_USER.format(question=question)}]


def reas_messages(question: str, plan: str, one_shot: bool = False) -> list[dict]:
    """What the reasoning agent sees in single-turn ReMA: the question and the meta-thinking agent's plan."""
    demo = _exchange(REAS_USER.format(question=ONE_SHOT["question"], plan=ONE_SHOT["plan"]), ONE_SHOT["solution"], one_shot)
    user = REAS_USER.format(question=question, plan=plan)
    return [{"role": "system", "content": REAS_SYSTEM}, *demo, {"role": "user", "content": user}]


def vrp_messages(question: str, one_shot: bool = False) -> list[dict]:
    """VRP baseline (chain of thought): one agent, the question as the user turn."""
    demo = _exchange(ONE_SHOT["question"], ONE_SHOT["solution"], one_shot)
    return [{"role": "system", "content": VRP_SYSTEM}, *demo, {"role": "user", "content": question}]


def mrp_messages(question: str, one_shot: bool = False) -> list[dict]:
    """MRP baseline: one agent writes the plan and then the solution in one reply."""
    demo = _exchange(ONE_SHOT["question"], ONE_SHOT["plan"] + "\n" + ONE_SHOT["solution"], one_shot)
    return [{"role": "system", "content": MRP_SYSTEM}, *demo, {"role": "user", "content": question}]


MULTITURN_REAS_FIRST_USER = "Question:\n{question}\n\nInstruction:\n{plan}"  # official code, docs/algorithm.md §1


def multiturn_meta_messages(question: str, one_shot: bool = False) -> list[dict]:
    """Multi-turn ReMA, the MTA's first turn; the RA's replies follow as user turns (docs/algorithm.md §1).
    one_shot (the cpu preset): first an example exchange whose instruction ends with [FINISH], the protocol that the
    paper's multi-turn runs learn by SFT before RL (sft.py); what to say, and when to finish, is left to RL."""
    demo = _exchange(ONE_SHOT["question"], f"{ONE_SHOT['plan']} {FINISH_FLAG}", one_shot)
    return [{"role": "system", "content": MULTITURN_META_SYSTEM}, *demo, {"role": "user", "content": question}]


def multiturn_reas_messages(question: str, plan: str, system: str = MULTITURN_REAS_SYSTEM,
                            one_shot: bool = False) -> list[dict]:
    """Multi-turn ReMA, the RA's first turn; the MTA's later turns follow as user turns (docs/algorithm.md §1).
    system: MULTITURN_REAS_SYSTEM (math), or MULTITURN_JUDGE_REAS_SYSTEM for the judge task; one_shot: the worked
    example first (the cpu preset), as in reas_messages."""
    demo = _exchange(MULTITURN_REAS_FIRST_USER.format(question=ONE_SHOT["question"], plan=ONE_SHOT["plan"]),
                     ONE_SHOT["solution"], one_shot)
    user = MULTITURN_REAS_FIRST_USER.format(question=question, plan=plan)
    return [{"role": "system", "content": system}, *demo, {"role": "user", "content": user}]


@dataclass(frozen=True)
class ChatPieces:
    """The text a chat template puts around a turn, so that a conversation can be extended with the token ids an
    agent actually sampled instead of re-rendering (and re-tokenizing) decoded text (docs/algorithm.md §15, items 6-7).

    For ChatML (SmolLM2, Qwen): user_prefix = "<|im_start|>user\n", user_suffix = "<|im_end|>\n<|im_start|>assistant\n"
    (it ends with the generation prompt) and closing = "<|im_end|>\n" (what follows an assistant message)."""

    user_prefix: str
    user_suffix: str
    closing: str

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatPieces":
        def chat(messages, gen):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

        base = [{"role": "system", "content": "SYSTEM@@"}, {"role": "user", "content": "USER@@"}]
        opened = chat(base, True)
        closed = chat(base + [{"role": "assistant", "content": "ASSISTANT@@"}], False)
        extended = chat(base + [{"role": "assistant", "content": "ASSISTANT@@"}, {"role": "user", "content": "NEXT@@"}], True)
        if not (closed.startswith(opened + "ASSISTANT@@") and extended.startswith(closed) and "NEXT@@" in extended[len(closed):]):
            raise ValueError("multi-turn ReMA needs a chat template that renders a conversation as the concatenation of "
                             "its turns (ChatML, Llama-3 and most instruct templates do); this tokenizer's does not")
        user_prefix, user_suffix = extended[len(closed):].split("NEXT@@")
        return cls(user_prefix, user_suffix, closed[len(opened) + len("ASSISTANT@@"):])


def render(tokenizer, messages: list[dict]) -> list[int]:
    """Chat-template a message list and return token ids, ending with the assistant generation prompt.

    Rendering to text and tokenizing without special tokens avoids the double BOS that
    `encode(templated_text)` adds for Llama-3 tokenizers (docs/algorithm.md §15, item 7)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- LLM-as-a-Judge: pair ranking (paper Sec. 4, App. G; docs/judge.md) ----
# Verdicts are "[[A]]" / "[[B]]" in every prompt. The paper's VRP judge prompt says "[A]" / "[B]" while its ReMA
# prompts say "[[A]]" / "[[B]]" (docs/algorithm.md §15, item 13); one format everywhere lets one strict parser grade
# every method, and the double brackets rarely occur by accident in a judge's explanation.
# The MTA prompt is the paper's (EvalPlanner, Saha et al. 2025). The paper describes the RA, VRP and MRP judge prompts
# without quoting them in full; the strings below are reconstructions in the MT-Bench pairwise-judge style they follow.
JUDGE_META_SYSTEM = (
    "We want to evaluate the quality of the responses provided by AI assistants to the user question displayed "
    "below. For that, your task is to help us build an evaluation plan that can then be executed to assess the "
    "response quality. Whenever appropriate, you can choose to also include a step-by-step reference answer as part "
    "of the evaluation plan."
)
JUDGE_META_USER = "[User Question]\n{question}\n[End of User Question]"
_JUDGE_RULES = (
    "Avoid any position biases and ensure that the order in which the responses were presented does not influence "
    "your decision. Do not allow the length of the responses to influence your evaluation. Be as objective as "
    "possible. Finally, output your verdict by strictly following this format: \"[[A]]\" if assistant A is better, "
    "\"[[B]]\" if assistant B is better."
)
JUDGE_REAS_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. You are given an evaluation plan: follow it step by step to compare the two "
    "responses. " + _JUDGE_RULES
)
JUDGE_VRP_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Think step by step: compare the two responses and explain. " + _JUDGE_RULES
)
JUDGE_MRP_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. Your first task is to write an evaluation plan for this question (whenever "
    "appropriate, include a step-by-step reference answer). Then follow your plan step by step to compare the two "
    "responses. " + _JUDGE_RULES
)
JUDGE_PAIR = (
    "[User Question]\n{question}\n[End of User Question]\n\n"
    "[The Start of Assistant A's Answer]\n{response_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{response_b}\n[The End of Assistant B's Answer]"
)
JUDGE_PLAN = "\n\n[The Start of Evaluation Plan]\n{plan}\n[The End of Evaluation Plan]"


def judge_meta_messages(question: str) -> list[dict]:
    """The meta-thinking agent writes an evaluation plan for the question (it does not see the responses)."""
    return [{"role": "system", "content": JUDGE_META_SYSTEM},
            {"role": "user", "content": JUDGE_META_USER.format(question=question)}]


def judge_reas_messages(question: str, response_a: str, response_b: str, plan: str) -> list[dict]:
    """The reasoning agent judges the pair by following the plan."""
    user = JUDGE_PAIR.format(question=question, response_a=response_a, response_b=response_b) + JUDGE_PLAN.format(plan=plan)
    return [{"role": "system", "content": JUDGE_REAS_SYSTEM}, {"role": "user", "content": user}]


def judge_vrp_messages(question: str, response_a: str, response_b: str) -> list[dict]:
    """VRP judge: one agent, chain of thought, then the verdict."""
    user = JUDGE_PAIR.format(question=question, response_a=response_a, response_b=response_b)
    return [{"role": "system", "content": JUDGE_VRP_SYSTEM}, {"role": "user", "content": user}]


def judge_mrp_messages(question: str, response_a: str, response_b: str) -> list[dict]:
    """MRP judge: one agent writes an evaluation plan, follows it, then gives the verdict."""
    user = JUDGE_PAIR.format(question=question, response_a=response_a, response_b=response_b)
    return [{"role": "system", "content": JUDGE_MRP_SYSTEM}, {"role": "user", "content": user}]


# Multi-turn ReMA on the judge task (not in the paper, whose multi-turn runs are math only): the conversation's
# question is the whole pair (JUDGE_PAIR), the MTA keeps its multi-turn prompt, and the RA's prompt asks for the
# verdict instead of a boxed answer.
MULTITURN_JUDGE_REAS_SYSTEM = (
    "Please reason step by step follow the given instruction to compare the two responses, when asked to finalize "
    "your answer, output your verdict by strictly following this format: \"[[A]]\" if assistant A is better, "
    "\"[[B]]\" if assistant B is better."
)


def judge_pair_text(question: str, response_a: str, response_b: str) -> str:
    """The judge task as one question text: the user question and both responses (multi-turn ReMA's question)."""
    return JUDGE_PAIR.format(question=question, response_a=response_a, response_b=response_b)
