"""The frozen towers' CPU kernels (promptclip.clip.kernels) and the in-place QuickGELU: same values as PyTorch's
own path (bitwise where the operations are the same, to float32 rounding where oneDNN sums in another order)."""

import pytest
import torch
import torch.nn.functional as F

from promptclip.clip import kernels
from promptclip.clip.architectures import build_random
from promptclip.clip.kernels import cpu_linear, frozen_linear, onednn_available, resolved_backend
from promptclip.clip.model import QuickGELU

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear op")


def operands(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 37, 96, generator=g)
    weight = torch.randn(160, 96, generator=g) / 10
    bias = torch.randn(160, generator=g)
    return x, weight, bias


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


@pytest.fixture
def onednn_calls(monkeypatch):
    """How many products took the oneDNN kernel."""
    calls = []
    original = kernels._onednn

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(kernels, "_onednn", counted)
    return calls


@needs_onednn
def test_onednn_linear_matches_f_linear(onednn_calls):
    x, weight, bias = operands()
    with cpu_linear("onednn"):
        out = frozen_linear(x, weight, bias)
    assert onednn_calls == [(3 * 37, 96)]  # it really took the oneDNN path
    close(out, F.linear(x, weight, bias))
    assert out.shape == (3, 37, 160)


@needs_onednn
def test_onednn_takes_non_contiguous_inputs():
    x, weight, bias = operands()
    x_t = x.transpose(0, 1)  # [37, 3, 96], not contiguous
    with cpu_linear("onednn"):
        close(frozen_linear(x_t, weight, bias), F.linear(x_t, weight, bias))


@pytest.mark.parametrize("case", ["blas", "trainable weight", "input gradient", "autocast", "float64"])
def test_falls_back_to_f_linear_bitwise(case, onednn_calls):
    """Products with a gradient through them stay on PyTorch's kernels (training gradients exactly as PyTorch's)."""
    x, weight, bias = operands()
    backend = "blas" if case == "blas" else "onednn"
    if case == "trainable weight":
        weight.requires_grad_(True)
    if case == "input gradient":
        x.requires_grad_(True)
    if case == "float64":
        x, weight, bias = x.double(), weight.double(), bias.double()
    with cpu_linear(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        ours = frozen_linear(x, weight, bias)
        reference = F.linear(x, weight, bias)
    assert torch.equal(ours, reference)
    assert onednn_calls == []


@needs_onednn
def test_without_autograd_trainable_weights_take_the_same_kernel_as_frozen_ones():
    """Under no_grad nothing gets a gradient: a model gives the same values whether its weights are frozen."""
    x, weight, bias = operands()
    with cpu_linear("onednn"), torch.no_grad():
        frozen = frozen_linear(x, weight, bias)
        trainable = frozen_linear(x, weight.clone().requires_grad_(True), bias.clone().requires_grad_(True))
    assert torch.equal(frozen, trainable)
    with cpu_linear("onednn"):
        assert torch.equal(frozen_linear(x, weight, bias), frozen)  # the kernel does not depend on the grad mode


def test_auto_picks_onednn_on_amd_only(monkeypatch):
    monkeypatch.setattr(kernels, "onednn_available", lambda: True)
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "AuthenticAMD")
    assert resolved_backend() == "onednn"
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "GenuineIntel")
    assert resolved_backend() == "blas"
    with cpu_linear("onednn"):
        assert resolved_backend() == "onednn"
    monkeypatch.setattr(kernels, "onednn_available", lambda: False)
    with cpu_linear("onednn"):
        assert resolved_backend() == "blas"  # asked for, but this build cannot


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="onednn"), cpu_linear("mkl"):
        pass


def test_in_place_quick_gelu_is_bitwise_the_autograd_formula():
    x = torch.randn(4, 50, 64, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        in_place = QuickGELU()(x)
    tracked = x.clone().requires_grad_(True)
    with_grad = QuickGELU()(tracked)
    assert torch.equal(in_place, x * torch.sigmoid(1.702 * x))
    assert torch.equal(in_place, with_grad.detach())
    with_grad.sum().backward()  # the autograd path still differentiates
    assert tracked.grad is not None


@needs_onednn
def test_tower_features_agree_between_backends():
    model = build_random("tiny", seed=3).requires_grad_(False)  # frozen, as methods hold it
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with cpu_linear("onednn"):
            fast = model.encode_image(images)
        with cpu_linear("blas"):
            plain = model.encode_image(images)
    close(fast, plain)
