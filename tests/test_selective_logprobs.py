"""selective_logprobs (the pure-torch twin) against a naive full-logits reference, and gradcheck in fp64."""

import pytest
import torch

import kernels.logprobs as sl
from kernels import selective_logprobs


def reference(hidden, weight, targets, temperature):
    logp = torch.log_softmax((hidden @ weight.T).double() / temperature, dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("n,h,v,temperature", [(1, 8, 17, 1.0), (37, 24, 131, 0.7), (64, 16, 1000, 1.3)])
def test_forward_and_backward_match_reference(n, h, v, temperature, monkeypatch):
    monkeypatch.setattr(sl, "_CHUNK_ELEMENTS", 5 * v)  # several row chunks even at these sizes
    g = torch.Generator().manual_seed(n * 1000 + v)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    logps, entropy = selective_logprobs(hidden, weight, targets, temperature)
    ref_logps, ref_entropy = reference(hidden, weight, targets, temperature)
    # fp32: logits reach ~20 here, and fp32 keeps ~1e-7 of that per operation: 2e-5 absolute is a few ulps
    torch.testing.assert_close(logps.double(), ref_logps, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-5, rtol=1e-5)
    up_l, up_e = torch.randn(n, generator=g), torch.randn(n, generator=g)
    grads = torch.autograd.grad((logps * up_l + entropy * up_e).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_logps * up_l + ref_entropy * up_e).sum(), (hidden, weight))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)


def test_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(sl, "_CHUNK_ELEMENTS", 2 * 13)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: selective_logprobs(h, w, targets, 0.9), (hidden, weight))


def test_frozen_head_gets_no_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    logps, _ = selective_logprobs(hidden, weight, torch.tensor([0, 3, 10, 5]))
    logps.sum().backward()
    assert hidden.grad is not None and weight.grad is None
