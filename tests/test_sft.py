"""sft.py: conversations and labels built by hand-checkable rules, and the script run end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sft
from utils import prompts
from utils.models import end_of_turn_ids, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

META_ROW = {"system": "You are a meta-think agent that represents human high-level think process, e.g. \n",
            "history": [["What is 2 + 3?", "Let us add."], ["5", "Check it."]],
            "instruction": "5 again", "input": None, "output": "Confirmed. [FINISH]"}
REAS_ROW = {"system": prompts.MULTITURN_REAS_SYSTEM, "history": [["Question:\nWhat is 2 + 3?\n\nInstruction:\nLet us add.", "5"]],
            "instruction": "Check it.", "input": "", "output": "5 again, so \\boxed{5}. [FINISH]"}


def loaded(row: dict) -> dict:
    """A row as load_examples returns it: instruction and output stored as question and answer."""
    out = {k: v for k, v in row.items() if k not in ("instruction", "output")}
    return out | {"question": row["instruction"], "answer": row["output"]}


def test_conversation_from_alpaca_row_and_system_prompt_choice():
    messages = sft.conversation(loaded(META_ROW), "data")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "Let us add." and messages[-1]["content"] == "Confirmed. [FINISH]"
    assert messages[0]["content"] == META_ROW["system"]
    assert sft.conversation(loaded(META_ROW), "rl")[0]["content"] == prompts.MULTITURN_META_SYSTEM  # the RL MTA prompt
    assert sft.conversation(loaded(REAS_ROW), "rl")[0]["content"] == REAS_ROW["system"]  # the RA prompt is the same in both
    assert sft.conversation(loaded(dict(META_ROW, input="extra")), "data")[-2]["content"] == "5 again\nextra"


def test_strip_finish_from_reasoning_turns_only():
    reas = sft.conversation(loaded(REAS_ROW), "data", reas_finish="strip")
    assert reas[-1]["content"] == "5 again, so \\boxed{5}."
    assert sft.conversation(loaded(REAS_ROW), "data")[-1]["content"].endswith("[FINISH]")  # keep: the data as is
    meta = sft.conversation(loaded(META_ROW), "data", reas_finish="strip")
    assert meta[-1]["content"] == "Confirmed. [FINISH]"  # the MTA's [FINISH] is what ends a conversation


def test_labels_cover_exactly_the_assistant_turns(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    stop = set(end_of_turn_ids(tokenizer))
    messages = sft.conversation(loaded(META_ROW), "data")
    ids, labels = sft.encode(tokenizer, messages, stop, 10_000)
    assert len(ids) == len(labels)
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token  # labels are the tokens themselves (the shift happens in the loss)
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    # one span per assistant message: its content and the end-of-turn token, not the newline after it
    assert [tokenizer.decode(s) for s in spans] == ["Let us add.<|im_end|>", "Check it.<|im_end|>",
                                                   "Confirmed. [FINISH]<|im_end|>"]
    # the whole sequence is the chat template's rendering of the conversation
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    short_ids, short_labels = sft.encode(tokenizer, messages, stop, 20)
    assert len(short_ids) == len(short_labels) == 20


def write_rows(path: Path, row: dict, n: int) -> Path:
    path.write_text("".join(json.dumps(dict(row, output=f"{row['output']} {i}")) + "\n" for i in range(n)))
    return path


def run_sft(tmp_path: Path, model: Path, *extra: str, launcher=None) -> Path:
    meta = write_rows(tmp_path / "meta.jsonl", META_ROW, 4)
    reas = write_rows(tmp_path / "reas.jsonl", REAS_ROW, 4)
    out = tmp_path / "sft"
    cmd = (launcher or [sys.executable]) + [str(ROOT / "sft.py"), "--model", str(model), "--datasets", str(meta), str(reas),
                                            "--output_dir", str(out), "--batch_size", "4", "--micro_batch_size", "2",
                                            "--num_train_epochs", "3", "--learning_rate", "3e-3", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def check_trained(out: Path, initial: Path) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # 8 conversations / batch 4 = 2 steps per epoch, 3 epochs
    assert all(math.isfinite(v) for r in rows for v in r.values())
    first, last = [r["sft/loss"] for r in rows[:2]], [r["sft/loss"] for r in rows[-2:]]
    assert sum(last) < sum(first), f"loss did not fall: {first} -> {last}"
    assert rows[-1]["sft/learning_rate"] < rows[0]["sft/learning_rate"]  # cosine decay
    before, after = load_file(initial / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert sum(not torch.equal(before[k], after[k]) for k in after if k in before) > 0
    assert (out / "model" / "tokenizer_config.json").exists()


def test_sft_end_to_end(tmp_path, tiny_model):
    check_trained(run_sft(tmp_path, tiny_model, "--system_prompt", "rl"), tiny_model)


def test_sft_two_cpu_processes(tmp_path, tiny_model):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "cpu_2proc.yaml")]
    check_trained(run_sft(tmp_path, tiny_model, launcher=launcher), tiny_model)


def test_sft_bad_row_names_file_line_and_field(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(META_ROW) + "\n" + json.dumps({"instruction": "x", "history": []}) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--model", str(tiny_model), "--datasets", str(bad),
                           "--output_dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "bad.jsonl line 2" in proc.stderr and "'output'" in proc.stderr


def test_builtin_sources_protocol_conversations_and_judge_format(tmp_path, tiny_model):
    """--datasets arithmetic: conversations that end the protocol with [FINISH] and a boxed answer (both views);
    --datasets arithmetic-judge: every judge prompt answered with the question worked out, then a verdict drawn at
    random."""
    from utils.data import ArithmeticConfig, arithmetic_conversations
    from utils.grading import parse_verdict
    from utils.judge_data import arithmetic_pairs, format_demonstrations

    cfg = ArithmeticConfig(max_operand=9, num_operands=3, operations="+-", train_size=40, test_size=10)
    rows = arithmetic_conversations(cfg, "train")
    assert len(rows) == 80  # two views per question
    meta, reas = sft.conversation(rows[0], "data"), sft.conversation(rows[1], "data")
    assert meta[0]["content"] == prompts.MULTITURN_META_SYSTEM and reas[0]["content"] == prompts.MULTITURN_REAS_SYSTEM
    assert meta[-1]["content"].endswith(prompts.FINISH_FLAG) and "\\boxed{" in reas[-1]["content"]
    assert len(meta) == len(reas) == 1 + 2 * 2  # two operations, two turns each side
    assert meta[3]["content"] == reas[2]["content"]  # the RA's first reply is the MTA's second user turn
    pairs = arithmetic_pairs(cfg, "train")
    assert len(pairs) == 80  # each question's pair in both orders
    demos = format_demonstrations(pairs, seed=0)
    verdicts = [parse_verdict(r["output"]) for r in demos]
    assert len(demos) == 4 * 80  # VRP, MRP, the MTA's plan, the RA following it
    assert all(v in ("A", "B") for i, v in enumerate(verdicts) if i % 4 != 2) and verdicts[2::4] == [None] * 80
    assert 0.3 < sum(v == "A" for v in verdicts if v) / 240 < 0.7  # drawn at random
    right = pairs[0]["response_A"] if pairs[0]["label"] == "A>B" else pairs[0]["response_B"]
    work = right.split(". The answer is")[0]
    assert work.count("=") == 2 and all(work in demos[i]["output"] for i in (0, 1, 3))  # the right steps, all methods
    assert pairs[1]["question"] == pairs[0]["question"] and work in demos[4]["output"]  # whichever order
    # the procedure, with the right verdict: both results listed with their letters, the working, the matching letter
    right_demos = format_demonstrations(pairs, seed=0, verdicts="right")
    assert [r["output"] for r in right_demos[2::4]] == [r["output"] for r in demos[2::4]]  # the same plans
    for i, pair in enumerate(pairs):
        letter = pair["label"][0]
        result_a, result_b = (pair[f"response_{x}"].rsplit(" ", 1)[-1].rstrip(".") for x in "AB")
        right_work = pair[f"response_{letter}"].split(". The answer is")[0]
        expected = f"Answers: {result_a} from A, {result_b} from B. Working it out: {right_work} from {letter}. [[{letter}]]"
        assert right_demos[4 * i]["output"] == expected  # VRP
        assert right_demos[4 * i + 1]["output"].endswith("Following the plan: " + expected)  # MRP
        assert right_demos[4 * i + 3]["output"] == "Following the plan: " + expected  # the RA
        assert result_a != result_b and right_work.endswith(" = " + (result_a if letter == "A" else result_b))
    assert {p["label"] for p in pairs} == {"A>B", "B>A"}  # both letters are taught
    with pytest.raises(ValueError, match="verdicts"):
        format_demonstrations(pairs, verdicts="best")
    for source in ("arithmetic", "arithmetic-judge"):
        out = tmp_path / source
        proc = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--model", str(tiny_model), "--datasets", source,
                               "--limit", "8", "--batch_size", "4", "--num_train_epochs", "1", "--output_dir", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # 8 conversations / batch 4
