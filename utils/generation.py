"""Batched generation behind one small function, with two backends: HF `generate` and a colocated vLLM engine.

`generate` takes token-id prompts and returns the sampled completion ids, cut after the first end-of-turn token
(which is kept: it was sampled, so it is trained on) or after the token that completes a stop string (multi-turn
ReMA stops at "[FINISH]"). The training scripts recompute log-probabilities themselves, so a backend only has to
return ids. `model` is an HF model, or a `utils.vllm_engine.VLLMEngine` (`--backend vllm`), which also returns its
sampling log-probs.

Seeded sampling (`seeds`, one per prompt) makes a prompt's completion a function of its own seed alone: not of the
other prompts in its batch, of the batch size, or of the process that generates it. So a 2-process run and a
1-process run with the same seeds sample the same completions, and a resumed run re-samples exactly (given the same
weights and the same kernels: the logits themselves still differ by float rounding across devices and batch shapes).
The HF path gives each prompt its own `torch.Generator` and samples each token by the inverse CDF of the warped
softmax (`SeededSampler`); vLLM takes a seed per request.
"""

import hashlib
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)


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


def sample_seed(*key: int | str) -> int:
    """A seed in [0, 2**32) that depends on `key` alone, e.g. (run seed, step, question index, sample index, agent):
    the same on every process and in a resumed run, so a sample does not depend on where or when it is drawn."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=4).digest(), "little")


class SeededSampler(LogitsProcessor):
    """Sampling with one random stream per sequence, for HF `generate(do_sample=False)`: each step this processor
    samples the token itself and returns scores whose argmax is that token (0 for it, -inf elsewhere), so greedy
    decoding emits it.

    Row r of the batch draws one uniform u per step from its own generator seeded with seeds[r], so the t-th token
    of a sequence depends on its seed, t and its own logits only. The token is the inverse-CDF sample: the first
    token whose cumulative probability under softmax(warped scores) reaches u (an exact sample from the warped
    softmax; tokens the warpers filtered have probability 0 and are never picked). The uniforms come from CPU
    generators, so the stream is the same on every device (torch's CPU generator keeps the low 32 bits of a seed);
    one number per row and step costs nothing next to the forward pass. Rows that have finished keep drawing (HF
    pads them): that only moves their own, discarded, later tokens."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float = 1.0, top_k: int = 0):
        assert temperature > 0, "temperature 0 is greedy: call generate without this processor"
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        # HF's own warpers, in the order its sampling path applies them (temperature, top-k, top-p)
        self.warpers = [TemperatureLogitsWarper(temperature)]
        self.warpers += [TopKLogitsWarper(top_k)] if top_k > 0 else []
        self.warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        assert scores.shape[0] == len(self.generators), f"{scores.shape[0]} rows for {len(self.generators)} seeds"
        scores = scores.float()  # (b, V)
        for warp in self.warpers:
            scores = warp(input_ids, scores)  # filtered tokens are -inf: probability 0
        cdf = torch.softmax(scores, -1).cumsum(-1)  # (b, V)
        u = 1.0 - torch.cat([torch.rand(1, generator=g) for g in self.generators])  # (b,) in (0, 1]
        u = u.to(cdf.device)[:, None] * cdf[:, -1:]  # (b, 1): scaled to the row's total (1 up to rounding)
        token = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[1] - 1)  # (b, 1): first index with cdf >= u
        return torch.full_like(scores, -math.inf).scatter_(1, token, 0.0)


@torch.no_grad()
def _shared_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, autocast):
    """The KV cache of every row's prompt but its last token, computed once per distinct prompt and copied to the rows
    that repeat it (the G samples of a prompt, the K RA answers under one plan), or None when no prompt repeats (or
    the prompts are one token long: HF needs one uncached token to start from). The prompt is most of what a short
    completion costs (the cpu preset's one-shot RA prompt: ~190 tokens before 32 new ones), so K = 6 copies prefill
    once, not 6 times.
    Positions follow the attention mask, as HF's own prefill sets them, so the copies continue as the rows would have
    from their own prefill up to float rounding (under bf16 autocast one bf16 unit of a logit, which changes some
    samples; bench/prefix_sharing.py counts them). Not under FSDP (`synced_gpus`): a forward pass there
    is a collective, and processes with different repeats would run different numbers of them."""
    rows = [tuple(r) for r in input_ids.tolist()]
    first: dict[tuple, int] = {}  # each distinct prompt -> its first row, in order of first appearance
    for i, r in enumerate(rows):
        first.setdefault(r, i)
    if len(first) == len(rows) or input_ids.shape[1] < 2:
        return None
    unique = torch.tensor(list(first.values()), device=input_ids.device)  # (u,)
    mask = attention_mask[unique, :-1]  # (u, P - 1)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (u, P - 1): HF's positions for left padding
    with autocast:
        cache = model(input_ids=input_ids[unique, :-1], attention_mask=mask, position_ids=positions,
                      use_cache=True).past_key_values
    slot = {r: j for j, r in enumerate(first)}  # each distinct prompt -> its row of the cache
    cache.reorder_cache(torch.tensor([slot[r] for r in rows], device=input_ids.device))  # (b, ...): one row per row
    return cache


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
    seeds: list[int] | None = None,
    should_stop=None,
    share_prefill: bool = True,
) -> list[Completion]:
    """Sample one completion per prompt with HF `generate` (temperature 0 means greedy). A completion ends at the
    first of `stop_ids` (kept) or at the token that completes one of `stop_strings` (kept).

    Prompts are sorted by length and cut into batches of `batch_size` to limit padding, left-padded (HF derives
    position ids from the attention mask, so padded and unpadded prompts give the same tokens), and the results
    are returned in the input order.

    With sharded weights (FSDP2) every forward pass all-gathers parameters, so every process must run the
    same number of forward passes: pass `synced_gpus=True` (HF keeps finished processes stepping) and give every
    process the same number of prompts (hence of batches).

    `seeds` (one per prompt, in [0, 2**32)): sample prompt i from its own random stream seeded with seeds[i] (see
    `SeededSampler`), so its completion does not depend on the batch it shares or the process that runs it. With
    temperature 0 the seeds are ignored (greedy); without seeds HF samples from the global torch RNG.

    `should_stop` (a callable, e.g. "was SIGTERM received?") is asked before every batch; once it says yes the
    remaining batches are skipped and their completions are missing from the result (the caller stops the run).

    `share_prefill`: a prompt that repeats within a batch is prefilled once (`_shared_prefill`); False prefills every
    row (bench/prefix_sharing.py times both)."""
    from utils.vllm_engine import VLLMEngine  # (imports no vLLM)

    if seeds is not None:
        assert len(seeds) == len(prompts), f"{len(seeds)} seeds for {len(prompts)} prompts: pass one per prompt"
        assert all(0 <= s < 2**32 for s in seeds), "seeds must lie in [0, 2**32) (torch's CPU generator keeps 32 bits)"
    if isinstance(model, VLLMEngine):
        return model.generate(tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, stop_ids=stop_ids, stop_strings=stop_strings, show_progress=show_progress,
                              seeds=seeds, should_stop=should_stop)
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_set = set(stop_ids)
    results: list[Completion | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    stops = dict(stop_strings=list(stop_strings), tokenizer=tokenizer) if stop_strings else {}
    seeded = seeds is not None and temperature > 0
    if temperature > 0 and not seeded:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:  # greedy, or seeded: SeededSampler picks each token (sampling flags would only draw HF warnings)
        sampling = dict(do_sample=False)
    if autocast_dtype is not None:
        autocast = torch.autocast(device.type, dtype=autocast_dtype)
    else:
        autocast = nullcontext()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not show_progress or len(batches) < 2, leave=False):
        if should_stop is not None and should_stop():
            break
        padded = tokenizer.pad({"input_ids": [prompts[i] for i in batch]}, return_tensors="pt", padding_side="left")
        input_ids = padded["input_ids"].to(device)  # (b, P)
        attention_mask = padded["attention_mask"].to(device)  # (b, P)
        share = share_prefill and not synced_gpus
        cache = _shared_prefill(model, input_ids, attention_mask, autocast) if share else None
        if seeded:  # row r of this batch is prompt batch[r]
            sampler = SeededSampler([seeds[i] for i in batch], temperature, top_p, top_k)
            sampling["logits_processor"] = LogitsProcessorList([sampler])
        with autocast:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                past_key_values=cache,
                synced_gpus=synced_gpus,
                **stops,
                **sampling,
            )  # (b, P + new)
        for row, i in enumerate(batch):
            results[i] = _cut(out[row, input_ids.shape[1] :].tolist(), stop_set, tokenizer, tuple(stop_strings))
    model.train(was_training)
    return [r for r in results if r is not None]
