"""selective_logprobs (the pure-torch twin) against a naive full-logits reference, and gradcheck in fp64."""

import pytest
import torch

import kernels.logprobs as sl
from kernels import selective_logprobs


def reference(hidden, weight, targets, temperature):
    logp = torch.log_softmax((hidden @ weight.T).double() / temperature, dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("head_trainable,entropy_grad", [(True, True), (False, False), (False, True)])
@pytest.mark.parametrize("n,h,v,temperature", [(1, 8, 17, 1.0), (37, 24, 131, 0.7), (64, 16, 1000, 1.3)])
def test_forward_and_backward_match_reference(n, h, v, temperature, head_trainable, entropy_grad, monkeypatch):
    # a frozen head without an entropy gradient takes the path that differentiates in the forward;
    # the others recompute the logits in chunks of the vocabulary in the backward
    monkeypatch.setattr(sl, "_CHUNK_ELEMENTS", 10 * v)  # several chunks of rows and of the vocabulary
    g = torch.Generator().manual_seed(n * 1000 + v)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=head_trainable)
    targets = torch.randint(0, v, (n,), generator=g)
    logps, entropy = selective_logprobs(hidden, weight, targets, temperature)
    ref_logps, ref_entropy = reference(hidden, weight, targets, temperature)
    # fp32: logits reach ~20 here, and fp32 keeps ~1e-7 of that per operation: 2e-5 absolute is a few ulps
    torch.testing.assert_close(logps.double(), ref_logps, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-5, rtol=1e-5)
    up_l, up_e = torch.randn(n, generator=g), torch.randn(n, generator=g)
    wrt = (hidden, weight) if head_trainable else (hidden,)
    loss, ref_loss = (logps * up_l).sum(), (ref_logps * up_l).sum()
    if entropy_grad:
        loss, ref_loss = loss + (entropy * up_e).sum(), ref_loss + (ref_entropy * up_e).sum()
    grads, ref_grads = torch.autograd.grad(loss, wrt), torch.autograd.grad(ref_loss, wrt)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)


def test_entropy_alone_has_a_gradient(monkeypatch):
    monkeypatch.setattr(sl, "_CHUNK_ELEMENTS", 3 * 29)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 5, dtype=torch.float64)
    targets = torch.randint(0, 29, (7,))
    assert torch.autograd.gradcheck(lambda x: selective_logprobs(x, weight, targets, 1.1)[1], (hidden,))


def test_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(sl, "_CHUNK_ELEMENTS", 2 * 13)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: selective_logprobs(h, w, targets, 0.9), (hidden, weight))
    # the frozen-head path, which differentiates in the forward
    assert torch.autograd.gradcheck(lambda h: selective_logprobs(h, weight.detach(), targets, 0.9)[0], (hidden,))


def test_frozen_head_gets_no_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    logps, _ = selective_logprobs(hidden, weight, torch.tensor([0, 3, 10, 5]))
    logps.sum().backward()
    assert hidden.grad is not None and weight.grad is None
