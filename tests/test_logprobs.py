"""token_logprobs against the plain full-vocabulary computation: the same log-probs, entropy and gradient."""

import pytest
import torch

from utils import logprobs
from utils.logprobs import token_logprobs


def plain(logits, tokens, temperature):
    x = logits[:, :-1].float() / temperature  # (N, C, V)
    logp = torch.log_softmax(x, -1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 2**24])  # several chunks per sequence (7 elements: one row each), or one
def test_matches_the_plain_log_softmax(monkeypatch, dtype, chunk):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    N, C, V, T = 3, 5, 11, 0.7
    base = (torch.randn(N, C + 1, V) * 3).to(dtype)
    tokens = torch.randint(0, V, (N, C))
    weights = torch.randn(N, C)  # an arbitrary upstream gradient

    ours_in = base.clone().requires_grad_()
    ours, ours_entropy = token_logprobs(ours_in, tokens, T, with_entropy=True)
    (ours * weights).sum().backward()

    ref_in = base.clone().requires_grad_()
    ref, ref_entropy = plain(ref_in, tokens, T)
    (ref * weights).sum().backward()

    assert ours.dtype == torch.float32 and ours.shape == (N, C)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_entropy, ref_entropy, rtol=0, atol=1e-5)
    assert not ours_entropy.requires_grad
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded to bf16 either way
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad.float(), rtol=0, atol=tol)
    assert (ours_in.grad[:, -1] == 0).all()  # the last position predicts nothing


def test_gradient_is_exact_in_float64():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (2, 3))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, 1.3)[0], (logits,))


def test_shape_is_checked():
    with pytest.raises(AssertionError):
        token_logprobs(torch.zeros(2, 4, 5), torch.zeros(2, 4, dtype=torch.long))
