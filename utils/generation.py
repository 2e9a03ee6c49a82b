"""Batched generation behind one small function, with two backends: HF `generate` and a colocated vLLM engine.

`generate` takes token-id prompts and returns the sampled completion ids, cut after the first end-of-turn token
(which is kept: it was sampled, so it is trained on) or after the token that completes a stop string (multi-turn
ReMA stops at "[FINISH]"). The training scripts recompute log-probabilities themselves, so a backend only has to
return ids. `model` is an HF model, or a `utils.vllm_engine.VLLMEngine` (`--backend vllm`), which also returns its
sampling log-probs.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class Completion:
    ids: list[int]  # sampled tokens, ending with the stop token unless truncated
    truncated: bool  # hit max_new_tokens without a stop token
    logprobs: list[float] | None = None  # vLLM backend: the sampler's log-prob of each of ids (after temperature)


def _cut(ids: list[int], stop_ids: set[int], tokenizer=None, stop_strings: tuple[str, ...] = ()) -> Completion:
    end = next((i + 1 for i, token in enumerate(ids) if token in stop_ids), None)
    kept = ids[:end] if end is not None else ids
    if stop_strings:
        def has_stop(n: int) -> bool:
            text = tokenizer.decode(kept[:n])
            return any(s in text for s in stop_strings)

        if has_stop(len(kept)):  # keep up to the token that completes the stop string (binary search on prefixes)
            lo, hi = 1, len(kept)
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
            return Completion(kept[:lo], truncated=False)
    return Completion(kept, truncated=end is None)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: list[int],
    stop_strings: tuple[str, ...] = (),
    batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    show_progress: bool = False,
    desc: str = "generate",
    synced_gpus: bool = False,
) -> list[Completion]:
    """Sample one completion per prompt with HF `generate` (temperature 0 means greedy). A completion ends at the
    first of `stop_ids` (kept) or at the token that completes one of `stop_strings` (kept).

    Prompts are sorted by length and cut into batches of `batch_size` to limit padding, left-padded (HF derives
    position ids from the attention mask, so padded and unpadded prompts give the same tokens), and the results
    are returned in the input order.

    With sharded weights (FSDP, ZeRO-3) every forward pass all-gathers parameters, so every process must run the
    same number of forward passes: pass `synced_gpus=True` (HF keeps finished processes stepping) and give every
    process the same number of prompts (hence of batches)."""
    from utils.vllm_engine import VLLMEngine  # (imports no vLLM)

    if isinstance(model, VLLMEngine):
        return model.generate(tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, stop_ids=stop_ids, stop_strings=stop_strings, show_progress=show_progress)
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_set = set(stop_ids)
    results: list[Completion | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    stops = dict(stop_strings=list(stop_strings), tokenizer=tokenizer) if stop_strings else {}
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 else dict(do_sample=False)
    if autocast_dtype is not None:
        autocast = torch.autocast(device.type, dtype=autocast_dtype)
    else:
        autocast = nullcontext()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not show_progress or len(batches) < 2, leave=False):
        padded = tokenizer.pad({"input_ids": [prompts[i] for i in batch]}, return_tensors="pt", padding_side="left")
        input_ids = padded["input_ids"].to(device)  # (b, P)
        with autocast:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=padded["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                synced_gpus=synced_gpus,
                **stops,
                **sampling,
            )  # (b, P + new)
        for row, i in enumerate(batch):
            results[i] = _cut(out[row, input_ids.shape[1] :].tolist(), stop_set, tokenizer, tuple(stop_strings))
    model.train(was_training)
    return results
