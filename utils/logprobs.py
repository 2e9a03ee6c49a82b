"""Log-probabilities of chosen tokens without full-vocabulary float32 logits for the whole batch.

The plain way, `log_softmax(logits.float() / T).gather(tokens)`, makes several (N, C, V) float32 tensors (the upcast,
the scaled copy, the log-softmax kept for the backward, the softmax of the entropy): at paper scale (C = 2048,
V = 152k for Qwen2.5) that is 1.2 GB per sequence for each of them. `token_logprobs` reads the model's logits (bf16
under autocast) a chunk of rows at a time, works in float32 inside the chunk, and keeps only the logits and one
log-normaliser per position for the backward, which recomputes the softmax chunk by chunk:

    logp_t = x_t[y_t] - logsumexp(x_t),  x_t = logits_t / T
    d logp_t / d logits_t = (onehot(y_t) - softmax(x_t)) / T
    entropy_t = logsumexp(x_t) - sum_v softmax(x_t)_v x_t,v      (no gradient)

Same values as the plain way (float32 arithmetic on the same logits), a fraction of the memory.
"""

import torch

from utils.batch import select

CHUNK_ELEMENTS = 2**24  # float32 elements per chunk: 64 MiB (341 positions of a 49k vocabulary)


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, with_entropy):
        N, C = tokens.shape  # logits: (N, C + 1, V), position t predicts tokens[:, t]
        V = logits.shape[-1]
        rows = max(1, CHUNK_ELEMENTS // V)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 (float64 stays float64)
        logp = torch.empty(N, C, dtype=dtype, device=logits.device)  # (N, C)
        lse = torch.empty_like(logp)  # (N, C)
        entropy = torch.empty_like(logp) if with_entropy else None
        for i in range(N):
            for s in range(0, C, rows):
                x = logits[i, s : min(s + rows, C)].to(dtype) / temperature  # (r, V)
                z = torch.logsumexp(x, -1)  # (r,)
                lse[i, s : s + len(z)] = z
                logp[i, s : s + len(z)] = x.gather(-1, tokens[i, s : s + len(z), None]).squeeze(-1) - z
                if with_entropy:
                    entropy[i, s : s + len(z)] = z - (torch.softmax(x, -1) * x).sum(-1)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        if with_entropy:
            ctx.mark_non_differentiable(entropy)
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, tokens, lse = ctx.saved_tensors
        N, C = tokens.shape
        V = logits.shape[-1]
        rows = max(1, CHUNK_ELEMENTS // V)
        grad = torch.zeros_like(logits)  # (N, C + 1, V); the last position predicts nothing
        for i in range(N):
            for s in range(0, C, rows):
                e = min(s + rows, C)
                g = grad_logp[i, s:e, None]  # (r, 1)
                d = torch.exp(logits[i, s:e].to(lse.dtype) / ctx.temperature - lse[i, s:e, None]) * -g  # (r, V): -p * g
                d.scatter_add_(-1, tokens[i, s:e, None], g)  # + g at the chosen token
                grad[i, s:e] = d / ctx.temperature
        return grad, None, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False):
    """logits (N, C + 1, V), where position t predicts tokens[:, t] (N, C). Returns log softmax(logits / T) of the
    chosen tokens, (N, C) float32, differentiable in logits; and, with with_entropy, the entropy of softmax(logits / T)
    at each position (N, C), without gradient."""
    assert logits.shape[:2] == (tokens.shape[0], tokens.shape[1] + 1), (logits.shape, tokens.shape)
    out = _TokenLogProbs.apply(logits, tokens, temperature, with_entropy)
    return out if with_entropy else (out, None)


def completion_logprobs(model, batch: dict, temperature: float, autocast, with_entropy: bool = False):
    """log pi(y_t | x, y_<t) of the tokens after the prompt of a collated batch (utils/batch.py): (N, C), and the
    entropy of pi at each position if asked (else None)."""
    C = batch["completion_ids"].shape[1]
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=C + 1, use_cache=False).logits  # (N, C+1, V)
    # position t predicts completion token t: log softmax(logits_t / T)[y_t] (and the entropy), computed a chunk of
    # positions at a time, so no (N, C, V) float32 copy of the logits is made
    return token_logprobs(logits, batch["completion_ids"], temperature, with_entropy)


@torch.no_grad()
def old_and_ref_logprobs(agent, batch: dict, old: bool, reference: bool, args, autocast) -> None:
    """pi_old (the policy that sampled, recomputed by the trainer before any update; docs/algorithm.md §5) and / or
    pi_ref (the initial model: with LoRA the base model with the adapters off) of a collated batch's completion tokens,
    into batch["old_logp"] / batch["ref_logp"]: (N, C), 0 at padding. Micro-batches of args.micro_batch_size
    sequences of similar lengths, at args.temperature."""
    mask = batch["completion_mask"]  # (N, C)
    logps = ({"old_logp": torch.zeros_like(mask)} if old else {}) | ({"ref_logp": torch.zeros_like(mask)} if reference else {})
    for idx in batch["attention_mask"].sum(-1).argsort().split(args.micro_batch_size):
        micro = select(batch, idx)  # (similar lengths; its padding columns cut off)
        if old:
            lp, _ = completion_logprobs(agent.model, micro, args.temperature, autocast)
            logps["old_logp"][idx, : lp.shape[1]] = lp
        if reference:
            if agent.adapter is not None:  # LoRA: the base model with the adapters off
                with agent.activate().disable_adapter():
                    lp, _ = completion_logprobs(agent.unwrapped, micro, args.temperature, autocast)
            else:
                lp, _ = completion_logprobs(agent.ref_model, micro, args.temperature, autocast)
            logps["ref_logp"][idx, : lp.shape[1]] = lp
    batch |= {k: v * mask for k, v in logps.items()}
