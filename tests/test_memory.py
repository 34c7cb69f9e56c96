"""Bounded text-tower memory (promptclip.memory): chunked + checkpointed text encoding is exact, and it is really
chunked, checkpointed and lighter; the engine applies the run's policy and restores the previous one."""

import threading

import pytest
import torch

from promptclip.clip.architectures import build_random
from promptclip.memory import TextMemory, current_text_memory, plan_text_pass, text_memory
from promptclip.methods import create_method
from promptclip.train import TrainConfig, fit

# Names of different BPE lengths, so that chunks end at different EOT positions (per-chunk truncation).
CLASSES = ["forest", "annual crop land", "sea or lake", "highway or road with many cars and trucks", "river",
           "pasture", "industrial buildings"]
CONFIGS = {
    "coop": {"n_ctx": 4, "init_seed": 3},
    "maple": {"depth": 9},
    "cocoop": {},
}


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny", seed=0)


def make_batch(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 3, 224, 224, generator=g), "label": torch.tensor([0, 3, 5])[:n]}


def perturbed(name, tiny):
    method = create_method(name, tiny, CLASSES, CONFIGS[name])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in method.named_trainable():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return method


class TextActivations:
    """Bytes autograd keeps for the backward from inside the text tower's blocks (checkpointed chunks keep none:
    their activations are recomputed in the backward)."""

    def __init__(self, clip):
        self.clip, self.total, self.inside = clip, 0, False

    def __enter__(self):
        def pack(t):
            if self.inside:
                self.total += t.numel() * t.element_size()
            return t

        def enter(module, args):
            self.inside = True

        def leave(module, args, output):
            self.inside = False

        self._handles = [self.clip.transformer.register_forward_pre_hook(enter),
                         self.clip.transformer.register_forward_hook(leave)]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


def train_step(method, tiny, policy: TextMemory):
    method.train()
    method.zero_grad(set_to_none=True)
    calls = []
    handle = tiny.transformer.resblocks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        with text_memory(policy), TextActivations(tiny) as saved:
            batch = make_batch()
            logits = method(batch)
            loss = method.loss(batch, logits)["loss"]
        forward_calls = len(calls)
        loss.backward()
    finally:
        handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in method.named_trainable() if p.grad is not None}
    return logits.detach(), loss.detach(), grads, forward_calls, len(calls), saved.total


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_checkpointed_text_encoding_is_exact(name, tiny):
    method = perturbed(name, tiny)
    plain = train_step(method, tiny, TextMemory("off"))
    # 40 tokens per chunk: 2-3 prompts per chunk here (CoCoOp: 21 sequences, MaPLe/CoOp: 7).
    chunked = train_step(method, tiny, TextMemory("always", chunk_tokens=40))
    logits, loss, grads = plain[:3]
    assert rel(chunked[0], logits) <= 1e-5
    assert rel(chunked[1], loss) <= 1e-5
    assert set(chunked[2]) == set(grads) and grads
    for key, grad in grads.items():
        assert grad.norm() > 0, key
        # A shared context's gradient sums B x C sequences with cancellation: fp32 summation-order noise alone
        # reaches 1e-5 of its norm (2e-6 .. 1e-5 over backbone seeds, with either CPU matmul kernel).
        assert rel(chunked[2][key], grad) <= 3e-5, key
    # It really ran in chunks, re-ran each chunk in the backward, and kept far fewer activations.
    assert plain[3] == plain[4] == 1
    assert chunked[3] >= 3 and chunked[4] == 2 * chunked[3]
    assert plain[5] > 1_000_000 and chunked[5] * 100 < plain[5], (chunked[5], plain[5])


def test_auto_policy_chunks_only_large_passes_and_checkpoints_only_with_gradients():
    policy = TextMemory("auto", chunk_tokens=100)
    assert plan_text_pass(5, 20, policy=policy, needs_grad=True) == plan_text_pass(5, 20, policy=policy,
                                                                                     needs_grad=True)
    assert plan_text_pass(5, 20, policy=policy, needs_grad=True).chunk is None  # 100 tokens: one plain pass
    big = plan_text_pass(6, 20, policy=policy, needs_grad=True)
    assert big.chunk == 5 and big.checkpoint
    assert not plan_text_pass(6, 20, policy=policy, needs_grad=False).checkpoint  # evaluation: no checkpoint
    assert plan_text_pass(6, 20, chunk_size=2, policy=policy, needs_grad=True).chunk == 2  # a method's own size
    off = plan_text_pass(1000, 20, policy=TextMemory("off"), needs_grad=True)
    assert off.chunk is None and not off.checkpoint
    assert plan_text_pass(3, 20, policy=TextMemory("always", 20), needs_grad=True).chunk == 1
    with pytest.raises(ValueError, match="mode"):
        TextMemory("sometimes")
    with pytest.raises(ValueError, match="must be one of"):
        TrainConfig(text_memory="sometimes")


def test_fit_applies_the_run_policy_and_restores_the_previous_one(tiny):
    method = create_method("coop", tiny, ["a", "b"], {"n_ctx": 2})
    seen = []
    forward = method.forward

    def spy(batch):
        seen.append(current_text_memory())
        return forward(batch)

    method.forward = spy
    data = [{"image": torch.randn(3, 224, 224), "label": i % 2} for i in range(4)]
    with text_memory("off"):
        fit(method, data, TrainConfig(batch_size=2, max_epoch=1, precision="fp32", text_memory="always",
                                      text_chunk_tokens=64), progress=False)
        assert current_text_memory() == TextMemory("off")
    assert seen and all(p == TextMemory("always", 64) for p in seen)
    assert current_text_memory() == TextMemory()


def test_policy_is_per_thread():
    inside = []
    with text_memory("off"):
        thread = threading.Thread(target=lambda: inside.append(current_text_memory()))
        thread.start()
        thread.join()
        assert current_text_memory().mode == "off"
    assert inside == [TextMemory()]
