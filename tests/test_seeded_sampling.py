"""Seeded sampling (`generate(..., seeds=...)`): a prompt's completion depends on its seed only, not on the batch
it is generated in, and each step is an exact sample from the warped softmax (inverse-CDF sampling from a per-prompt generator)."""

import random

import pytest
import torch

from tests.conftest import single_turn_example
from utils.generation import SeededSampler, generate

# a fixed logits vector (V = 8) whose top-p = 0.8 set (4 tokens at T = 1.3) differs from its top-3 set
LOGITS = torch.tensor([1.0, 2.0, 0.5, 1.5, -1.0, 0.0, -2.0, -0.5])
T = 1.3


def expected_probs(top_k: int, top_p: float) -> torch.Tensor:
    """softmax(LOGITS / T) restricted to the top-k tokens, then to the smallest most-probable set of mass >= top_p,
    renormalized: written out independently of HF's warpers."""
    probs = torch.softmax(LOGITS.double() / T, -1)  # (V,)
    order = probs.argsort(descending=True)
    keep = torch.zeros(len(probs), dtype=torch.bool)
    mass = 0.0
    for rank, token in enumerate(order.tolist()):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        keep[token] = True
        mass += probs[token].item()
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("top_k,top_p,kept", [(0, 1.0, 8), (3, 1.0, 3), (0, 0.8, 4)])
def test_seeded_sampler_draws_from_the_warped_softmax(top_k, top_p, kept):
    expected = expected_probs(top_k, top_p)
    assert int((expected > 0).sum()) == kept  # the cases are the ones they claim to be
    n = 20_000
    # across seeds: n rows with seeds 0..n-1 in one call
    sampler = SeededSampler(list(range(n)), T, top_p=top_p, top_k=top_k)
    across_seeds = sampler(None, LOGITS.expand(n, -1)).argmax(-1)  # (n,)
    # along one sequence: one row, its generator advancing step after step
    sampler = SeededSampler([12345], T, top_p=top_p, top_k=top_k)
    along_steps = torch.cat([sampler(None, LOGITS[None]).argmax(-1) for _ in range(n)])  # (n,)
    for tokens in (across_seeds, along_steps):
        freq = torch.bincount(tokens, minlength=len(LOGITS)).double() / n
        assert (freq[expected == 0] == 0).all()  # filtered tokens never appear
        assert (freq - expected).abs().max() < 0.01  # 1 sigma is at most 0.0035 here


def test_seeded_sampler_casts_low_precision_scores_and_picks_one_token():
    scores = LOGITS.to(torch.bfloat16).expand(3, -1)
    out = SeededSampler([1, 1, 2], T)(None, scores)
    assert out.dtype == torch.float32
    assert ((out == 0).sum(-1) == 1).all() and ((out == -torch.inf).sum(-1) == len(LOGITS) - 1).all()  # one-hot
    assert torch.equal(out[0], out[1])  # same seed, same token


@pytest.fixture(scope="module")
def setup(tiny_model):
    from utils import prompts
    from utils.models import end_of_turn_ids, load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model))
    rng = random.Random(0)
    batch = [prompts.render(tokenizer, single_turn_example(rng, tokenizer)[0]) for _ in range(8)]
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50, stop_ids=end_of_turn_ids(tokenizer))
    return model, tokenizer, batch, kw


def test_seeded_completions_do_not_depend_on_batching(setup):
    model, tokenizer, batch, kw = setup
    assert len({len(p) for p in batch}) > 1  # prompts of several lengths: batches are padded and re-sorted
    seeds = [1000 + i for i in range(len(batch))]
    runs = [[c.ids for c in generate(model, tokenizer, batch, seeds=seeds, batch_size=b, **kw)] for b in (1, 3, 64)]
    perm = list(range(len(batch)))
    random.Random(1).shuffle(perm)
    shuffled = generate(model, tokenizer, [batch[i] for i in perm], seeds=[seeds[i] for i in perm], batch_size=3, **kw)
    unshuffled = [None] * len(batch)
    for j, i in enumerate(perm):
        unshuffled[i] = shuffled[j].ids
    assert runs[0] == runs[1] == runs[2] == unshuffled
    # the seeds are actually used: other seeds give other samples
    other = [c.ids for c in generate(model, tokenizer, batch, seeds=[s + 1 for s in seeds], batch_size=64, **kw)]
    assert other != runs[0]


def test_same_prompt_same_seed_same_sample(setup):
    model, tokenizer, batch, kw = setup
    seeds = [7, 7, 8, 9, 10, 11]
    out = [tuple(c.ids) for c in generate(model, tokenizer, [batch[0]] * len(seeds), seeds=seeds, **kw)]
    assert out[0] == out[1]
    assert len(set(out)) > 1  # different seeds can give different completions of one prompt


def test_greedy_ignores_seeds(setup):
    model, tokenizer, batch, kw = setup
    kw = kw | dict(temperature=0.0)
    greedy = [c.ids for c in generate(model, tokenizer, batch, **kw)]
    assert [c.ids for c in generate(model, tokenizer, batch, seeds=list(range(len(batch))), **kw)] == greedy


def test_no_seeds_samples_with_hf(setup):
    """seeds=None is HF's own sampling from the global RNG: the same tokens as calling `model.generate` directly."""
    model, tokenizer, batch, kw = setup
    ordered = sorted(batch, key=len)  # already in generate's (stable) length order: one batch, same rows
    torch.manual_seed(0)
    ours = generate(model, tokenizer, ordered, batch_size=64, **kw)
    padded = tokenizer.pad({"input_ids": ordered}, return_tensors="pt", padding_side="left")
    torch.manual_seed(0)
    out = model.generate(**padded, max_new_tokens=kw["max_new_tokens"], do_sample=True, temperature=kw["temperature"],
                         top_p=kw["top_p"], top_k=kw["top_k"], eos_token_id=kw["stop_ids"],
                         pad_token_id=tokenizer.pad_token_id)  # (B, P + new)
    for row, c in enumerate(ours):
        assert c.ids == out[row, padded["input_ids"].shape[1] :].tolist()[: len(c.ids)]


def test_seeds_are_checked(setup):
    model, tokenizer, batch, kw = setup
    with pytest.raises(AssertionError, match="one per prompt"):
        generate(model, tokenizer, batch, seeds=[0], **kw)
    with pytest.raises(AssertionError, match="2\\*\\*32"):
        generate(model, tokenizer, batch[:1], seeds=[2**32], **kw)


def test_repeated_prompts_share_one_prefill_and_sample_as_alone(setup):
    """A batch that repeats prompts (G samples of a prompt, K RA answers under a plan) prefills each distinct prompt
    once and copies its KV cache to the repeats: the first forward pass sees one row per distinct prompt, and every
    completion is the one that prompt and seed give when generated alone (batch_size=1: nothing to share)."""
    model, tokenizer, batch, kw = setup
    repeated = [batch[0], batch[1], batch[0], batch[2], batch[1], batch[0]]  # 3 distinct prompts, 6 rows
    seeds = [11, 12, 13, 14, 15, 16]
    first_rows = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: first_rows.append(kwargs["input_ids"].shape[0]) if not first_rows else None,
        with_kwargs=True)
    try:
        shared = [c.ids for c in generate(model, tokenizer, repeated, seeds=seeds, batch_size=64, **kw)]
    finally:
        hook.remove()
    assert first_rows == [3]
    alone = [c.ids for c in generate(model, tokenizer, repeated, seeds=seeds, batch_size=1, **kw)]
    assert shared == alone
    assert len({tuple(ids) for ids in shared}) > 1  # the seeds made different samples of the repeated prompts
    greedy = kw | dict(temperature=0.0)
    assert ([c.ids for c in generate(model, tokenizer, repeated, **greedy)]
            == [c.ids for c in generate(model, tokenizer, repeated, batch_size=1, **greedy)])
