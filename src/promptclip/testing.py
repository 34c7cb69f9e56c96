"""The method contract, as a library: the checks every built-in method passes, for the tests of your own method.

One line in a plugin's test file::

    from promptclip.testing import check_method

    def test_my_method_keeps_the_contract():
        check_method(MyPrompt)              # or check_method("my_prompt"), check_method(MyPrompt, {"depth": 2})

It runs every check on a small random backbone (12 layers per tower, so official prompt depths fit, with unequal,
unusual widths, so hard-coded dimensions fail), the method's default config unless one is given, and raises
:class:`ContractError` listing every check that failed. ``checks=["gradients"]`` runs only some (:data:`CHECKS`).
The class is registered (as :func:`promptclip.methods.register` would) since the adapter round trip rebuilds it by
name.

The checks:

``logits``
    ``[B, C]`` finite logits in eval and train mode.
``gradients``
    a training loss puts gradients on method tensors only, never on a backbone tensor; a method that learns nothing
    builds no graph at all.
``frozen_backbone``
    no trainable tensor is a backbone tensor; an optimizer step changes method tensors and leaves every backbone
    tensor and buffer as it was; ``train()`` keeps the backbone in eval mode.
``adapter_round_trip``
    the adapter holds exactly the trainable tensors (no backbone tensor); loading it strictly rebuilds identical
    logits.
``class_names``
    ``set_classnames`` changes the number of classes, and back gives the same logits.
``determinism``
    two methods built with the same config have the same tensors and logits.
``batch_independence``
    an image's eval logits do not depend on the rest of its batch, unless ``batch_independent`` says otherwise
    (then they must depend on it).
``text_memory``
    loss and gradients are the same with the text-memory policy off and with ``always`` chunking and
    checkpointing; under ``always`` the trainable text passes really run in chunks and again in the backward
    (:mod:`promptclip.memory`; encode learned text prompts with
    :func:`promptclip.methods.prompts.encode_text_embeddings`), unless ``follows_text_memory`` is False.
``eval_image_passes``
    evaluation runs the image tower once per image: nothing only training needs (a frozen teacher pass, a second
    image pass) runs at evaluation.
``frozen_image_features``
    a method declaring ``frozen_image_features`` gives the same logits from precomputed ``image_features`` in the
    batch (the evaluation feature cache) as from the images, without running the image tower.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .clip.architectures import build_random
from .clip.model import CLIP, CLIPConfig
from .memory import TextMemory, text_memory
from .methods import PromptMethod, create_method, get_method_class, register

#: The contract backbone: 12 layers per tower, small unequal widths, 64-pixel images.
CONTRACT_BACKBONE = CLIPConfig(embed_dim=96, image_size=64, vision_layers=12, vision_width=192, vision_patch_size=16,
                               vision_heads=3, context_length=77, vocab_size=49408, text_width=128, text_heads=2,
                               text_layers=12)
CLASSES = ("annual crop land", "forest", "sea or lake", "highway or road")
OTHER_CLASSES = ("river", "pasture land")
TEMPLATE = "a centered satellite photo of {}."
#: Relative tolerance of the text-memory check (chunked passes reorder float sums).
TEXT_MEMORY_RTOL = 1e-4


class ContractError(AssertionError):
    """A method breaks the method contract."""


def contract_backbone(seed: int = 11) -> CLIP:
    """The backbone the checks run on (random weights)."""
    return build_random(CONTRACT_BACKBONE, seed=seed)


def make_batch(n: int = 4, seed: int = 0, image_size: int = 64, num_classes: int = len(CLASSES)) -> dict[str, Any]:
    """A batch with every key a built-in method reads: ``image``, ``label``, ``caption``, ``index``, and
    ``image_view2`` (a second view, for methods with ``train_views = 2``)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, image_size, image_size, generator=g)
    return {
        "image": image,
        "image_view2": image.flip(-1) + 0.1 * torch.randn(n, 3, image_size, image_size, generator=g),
        "label": torch.arange(n) % num_classes,
        "caption": [f"an aerial image with texture number {i}" for i in range(n)],
        "index": torch.arange(n),
    }


@dataclass
class Subject:
    """What the checks run on: a registered method, its config, the backbone, the classes and a batch maker."""

    name: str
    config: Mapping[str, Any] | Any
    backbone: CLIP
    classnames: tuple[str, ...] = CLASSES
    template: str = TEMPLATE
    batch_maker: Callable[[int, int], dict[str, Any]] | None = None

    def build(self) -> PromptMethod:
        method = create_method(self.name, self.backbone, list(self.classnames), self.config, template=self.template)
        if method.fits_on_features:  # checked once fitted (its state, e.g. a cache, comes from the data)
            fit_on_batch(method, self.batch(8, seed=1))
        return method

    def batch(self, n: int = 4, seed: int = 0) -> dict[str, Any]:
        if self.batch_maker is not None:
            return self.batch_maker(n, seed)
        return make_batch(n, seed, self.backbone.visual.input_resolution, len(self.classnames))


def fit_on_batch(method: PromptMethod, batch: Mapping[str, Any]) -> None:
    """Fit a ``fits_on_features`` method on the frozen features of one batch (every view and the un-augmented
    train, val and test splits: the same images), a short deterministic fit for the checks."""
    from .feature_fit import FeatureFitData
    from .train import TrainConfig

    with torch.no_grad():
        features = method.clip.encode_image(batch["image"]).float()
    labels = torch.as_tensor(batch["label"], dtype=torch.long)
    config = TrainConfig(batch_size=4, max_epoch=1, warmup_epoch=0, optimizer="adamw", lr=1e-3)
    data = FeatureFitData(lambda start, count: features.expand(count, *features.shape), labels,
                          {"train": (features, labels), "val": (features, labels), "test": (features, labels)}, config)
    method.fit_features(data)
    method.train()


def _fail(text: str) -> None:
    raise ContractError(text)


def _perturb(method: PromptMethod, seed: int = 0) -> None:
    """Move every trainable tensor off its init, so that checks see learned values (zero-init tensors included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in method.named_trainable():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


def _eval_logits(method: PromptMethod, batch: Mapping[str, Any]) -> torch.Tensor:
    method.eval()
    with torch.no_grad():
        return method(batch)


def _backbone_ids(backbone: CLIP) -> set[int]:
    return {id(t) for t in (*backbone.parameters(), *backbone.buffers())}


def _backbone_names(method: PromptMethod, backbone: CLIP) -> set[str]:
    """Names under which ``method`` reaches backbone tensors (``clip.*`` and any other attribute holding them)."""
    ids = _backbone_ids(backbone)
    named = [*method.named_parameters(remove_duplicate=False), *method.named_buffers(remove_duplicate=False)]
    return {n for n, t in named if id(t) in ids}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# -- the checks -------------------------------------------------------------------------------------------------------


def check_logits(subject: Subject) -> None:
    method = subject.build()
    batch = subject.batch()
    n, classes = len(batch["label"]), len(subject.classnames)
    for mode in ("eval", "train"):
        method.train(mode == "train")
        with torch.no_grad():
            logits = method(batch)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (n, classes):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            _fail(f"{mode}-mode forward returned {shape}, expected logits of shape ({n}, {classes})")
        if not torch.isfinite(logits).all():
            _fail(f"{mode}-mode logits are not all finite")


def check_gradients(subject: Subject) -> None:
    method = subject.build()
    method.train()
    batch = subject.batch()
    loss = method.loss(batch, method(batch))["loss"]
    if method.num_trainable() == 0:
        if loss.grad_fn is not None:
            _fail("the method has no trainable tensor, yet its loss has a gradient graph (a tensor requires grad "
                  "without being a registered nn.Parameter?)")
        return
    loss.backward()
    leaked = sorted({n for n, p in method.named_parameters(remove_duplicate=False)
                     if id(p) in _backbone_ids(subject.backbone) and (p.grad is not None or p.requires_grad)})
    learning = any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for _, p in method.named_trainable())
    method.zero_grad(set_to_none=True)
    if leaked:
        _fail(f"backbone tensors get gradients: {', '.join(leaked[:5])}{' ...' if len(leaked) > 5 else ''} (the "
              "backbone is frozen; learn your own tensors and inject them through the hooks)")
    if not learning:
        _fail("the loss gives no method tensor a non-zero gradient")


def check_frozen_backbone(subject: Subject) -> None:
    backbone = subject.backbone
    method = subject.build()
    shared = sorted(n for n, p in method.named_trainable() if id(p) in _backbone_ids(backbone))
    if shared:
        _fail(f"trainable tensors are backbone tensors: {', '.join(shared[:5])}")
    method.train()
    if backbone.training or any(m.training for m in backbone.modules()):
        _fail("train() put the backbone in training mode (its BatchNorm/dropout must stay in eval)")
    if method.num_trainable() == 0:
        return
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    learned = method.adapter_state()
    optimizer = torch.optim.SGD([p for _, p in method.named_trainable()], lr=0.1, momentum=0.9, weight_decay=5e-4)
    batch = subject.batch()
    method.loss(batch, method(batch))["loss"].backward()
    optimizer.step()
    method.zero_grad(set_to_none=True)
    after = backbone.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    if changed:
        for k in changed:  # leave the shared backbone as it was for the other checks
            after[k].copy_(before[k])
        _fail(f"a training step changed backbone tensors: {', '.join(changed[:5])}")
    if not any(not torch.equal(p, learned[n]) for n, p in method.named_trainable()):
        _fail("an optimizer step changed no method tensor")


def check_adapter_round_trip(subject: Subject) -> None:
    from .checkpoint import load_adapter, read_adapter, save_adapter

    method = subject.build()
    _perturb(method)
    with tempfile.TemporaryDirectory(prefix="promptclip-contract-") as tmp:
        path = save_adapter(Path(tmp) / "adapter", method, "contract", "contract-fingerprint")
        meta, tensors = read_adapter(path)
        trainable = {n for n, _ in method.named_trainable()} | {n for n, _ in method.trainable_buffers()}
        if set(tensors) != trainable:
            _fail(f"the adapter holds {sorted(tensors)}, the trainable tensors (and trainable_buffers) are "
                  f"{sorted(trainable)}")
        backbone_tensors = sorted(set(tensors) & _backbone_names(method, subject.backbone))
        if backbone_tensors:
            _fail(f"the adapter holds backbone tensors: {', '.join(backbone_tensors[:5])}")
        buffers = sum(b.numel() for _, b in method.trainable_buffers())
        if sum(t.numel() for t in tensors.values()) != method.num_trainable() + buffers:
            _fail("the adapter's tensors do not add up to num_trainable()")
        if meta.get("method_source", {}).get("kind") is None:
            _fail("the adapter does not record where its method comes from")
        loaded = load_adapter(path, subject.backbone, backbone_fingerprint="contract-fingerprint")
    batch = subject.batch()
    if not torch.equal(_eval_logits(loaded, batch), _eval_logits(method, batch)):
        _fail("a method loaded from its adapter gives other logits than the one saved (state outside the trainable "
              "tensors, or load_adapter_state drops some?)")


def check_class_names(subject: Subject) -> None:
    method = subject.build()
    _perturb(method)
    batch = subject.batch()
    original = _eval_logits(method, batch)
    method.set_classnames(list(OTHER_CLASSES))
    swapped = _eval_logits(method, batch)
    if swapped.shape[-1] != len(OTHER_CLASSES):
        _fail(f"after set_classnames with {len(OTHER_CLASSES)} names the logits have {swapped.shape[-1]} classes "
              "(rebuild class-dependent buffers in rebuild_class_buffers)")
    method.set_classnames(list(subject.classnames))
    if not torch.allclose(_eval_logits(method, batch), original, atol=1e-5 * max(1.0, float(original.abs().max()))):
        _fail("swapping the class names and back changes the logits (learned tensors touched by set_classnames?)")


def check_determinism(subject: Subject) -> None:
    a, b = subject.build(), subject.build()
    ta, tb = dict(a.named_trainable()), dict(b.named_trainable())
    if set(ta) != set(tb) or any(not torch.equal(ta[n], tb[n]) for n in ta):
        _fail("two methods built with the same config have different initial tensors (draw them from a seeded "
              "torch.Generator, never the global RNG)")
    batch = subject.batch()
    if not torch.equal(_eval_logits(a, batch), _eval_logits(b, batch)):
        _fail("two methods built with the same config give different logits")


def check_batch_independence(subject: Subject) -> None:
    method = subject.build()
    _perturb(method)
    batch = subject.batch()
    n = len(batch["label"])
    whole = _eval_logits(method, batch)

    def part(rows: slice) -> dict[str, Any]:
        return {k: v[rows] for k, v in batch.items()}

    halves = torch.cat([_eval_logits(method, part(slice(0, n // 2))), _eval_logits(method, part(slice(n // 2, n)))])
    close = torch.allclose(whole, halves, atol=1e-5 * max(1.0, float(whole.abs().max())))
    if method.batch_independent and not close:
        _fail("an image's logits change with the rest of its batch; declare it (a `batch_independent` property "
              "returning False) if the method is meant to be batch-dependent")
    if not method.batch_independent and close:
        _fail("the method declares batch dependence (batch_independent is False) but shows none")


def check_text_memory(subject: Subject) -> None:
    method = subject.build()
    if method.num_trainable() == 0:
        return
    _perturb(method)
    batch = subject.batch()
    passes: list[tuple[int, int, bool]] = []  # (sequences, tokens, input requires grad) per first-text-block pass
    handle = subject.backbone.transformer.resblocks[0].register_forward_pre_hook(
        lambda module, args: passes.append((args[0].shape[0], args[0].shape[1], args[0].requires_grad)))

    def train_step(policy: TextMemory):
        method.train()
        method.zero_grad(set_to_none=True)
        passes.clear()
        with text_memory(policy):
            loss = method.loss(batch, method(batch))["loss"]
        in_forward = len(passes)
        loss.backward()
        forward = [(n, tokens) for n, tokens, grad in passes[:in_forward] if grad]
        backward = passes[in_forward:]
        grads = {n: p.grad.detach().clone() for n, p in method.named_trainable() if p.grad is not None}
        method.zero_grad(set_to_none=True)
        return loss.detach(), grads, forward, backward

    try:
        loss, grads, plain_passes, _ = train_step(TextMemory("off"))
        # A budget of half the learned text tokens: the policy must split them into (at least) two chunks.
        total = sum(n for n, _ in plain_passes)
        budget = max(1, total * max((t for _, t in plain_passes), default=1) // 2)
        chunked_loss, chunked_grads, chunked_passes, backward = train_step(TextMemory("always", chunk_tokens=budget))
    finally:
        handle.remove()
    forward = [n for n, _ in chunked_passes]
    if _rel(chunked_loss, loss) > TEXT_MEMORY_RTOL:
        _fail(f"the loss differs with the text memory policy 'always' (chunks + checkpoints) and 'off': "
              f"{float(chunked_loss)} vs {float(loss)}")
    if set(chunked_grads) != set(grads):
        _fail("the tensors that get gradients differ between text memory policies 'always' and 'off'")
    # Each element against the largest gradient element of any tensor: a gradient that is zero in exact arithmetic
    # (an attention key bias) is float noise whose own relative error means nothing.
    scale = max(float(g.abs().max()) for g in grads.values()) if grads else 0.0
    for name, grad in grads.items():
        error = float((chunked_grads[name] - grad).abs().max())
        if error > TEXT_MEMORY_RTOL * scale:
            _fail(f"the gradient of {name} differs between text memory policies 'always' and 'off' (by {error:.3g}; "
                  f"the largest gradient element is {scale:.3g})")
    if not plain_passes or not getattr(method, "follows_text_memory", True):
        return  # no learned text pass, or a method that declares it cannot follow the policy
    if len(forward) < 2 or max(forward) >= total:
        _fail(f"under text memory 'always' the learned text prompts still ran in {len(forward)} pass(es) of up to "
              f"{max(forward, default=0)} sequences: encode them with promptclip.methods.prompts."
              "encode_text_embeddings (which chunks them), or set follows_text_memory = False with the reason")
    if not backward:
        _fail("under text memory 'always' the text tower was not run again in the backward (not checkpointed)")


def _count_image_passes(backbone: CLIP, counts: list[int]):
    """A pre-hook on the image tower's first block adding the batch size of every pass to ``counts``."""
    return backbone.visual.blocks[0].register_forward_pre_hook(lambda _module, args: counts.append(args[0].shape[0]))


def check_eval_image_passes(subject: Subject) -> None:
    method = subject.build()
    method.eval()
    counts: list[int] = []
    handle = _count_image_passes(subject.backbone, counts)
    try:
        with torch.no_grad():
            for seed in (0, 1):
                method(subject.batch(3, seed))
    finally:
        handle.remove()
    if sum(counts) != 6:
        _fail(f"evaluating 2 batches of 3 images ran the image tower on {sum(counts)} images: evaluation must not "
              "compute what only training needs (a frozen teacher, a second image pass)")


def check_frozen_image_features(subject: Subject) -> None:
    method = subject.build()
    if not getattr(method, "frozen_image_features", False):
        return
    _perturb(method)
    batch = subject.batch()
    from_images = _eval_logits(method, batch)
    with torch.no_grad():
        features = subject.backbone.encode_image(batch["image"])
    counts: list[int] = []
    handle = _count_image_passes(subject.backbone, counts)
    try:
        precomputed = {k: v for k, v in batch.items() if k != "image"} | {"image_features": features}
        from_features = _eval_logits(method, precomputed)
    finally:
        handle.remove()
    if not torch.equal(from_features, from_images):
        _fail("the method declares frozen_image_features but its logits from precomputed batch['image_features'] "
              "differ from those from the images (read them with image_features_of(batch))")
    if counts:
        _fail("the method declares frozen_image_features but ran the image tower although the batch holds "
              "image_features")


#: Every check by name, in the order they run.
CHECKS: dict[str, Callable[[Subject], None]] = {
    "logits": check_logits,
    "gradients": check_gradients,
    "frozen_backbone": check_frozen_backbone,
    "adapter_round_trip": check_adapter_round_trip,
    "class_names": check_class_names,
    "determinism": check_determinism,
    "batch_independence": check_batch_independence,
    "text_memory": check_text_memory,
    "eval_image_passes": check_eval_image_passes,
    "frozen_image_features": check_frozen_image_features,
}


def check_method(method: type[PromptMethod] | str, config: Mapping[str, Any] | Any = None, *,
                 checks: Iterable[str] | None = None, backbone: CLIP | None = None,
                 classnames: Iterable[str] = CLASSES, template: str = TEMPLATE,
                 batch: Callable[[int, int], dict[str, Any]] | None = None) -> None:
    """Run the contract checks (module docstring) on a method class or registered name; raise
    :class:`ContractError` naming every check that fails.

    ``config``: a dict of config fields or the config object (default: the class's defaults). ``checks``: names from
    :data:`CHECKS` (default: all). ``backbone``: another frozen backbone (default: :func:`contract_backbone`).
    ``batch(n, seed)``: batches with the extra keys your method reads (default: :func:`make_batch`).
    """
    if isinstance(method, str):
        cls = get_method_class(method)
    else:
        cls = register(method)
    names = list(checks) if checks is not None else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown contract check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    subject = Subject(cls.name, config, backbone if backbone is not None else contract_backbone(),
                      tuple(classnames), template, batch)
    failures: list[str] = []
    first: BaseException | None = None
    for name in names:
        try:
            CHECKS[name](subject)
        except ContractError as err:
            failures.append(f"{name}: {err}")
            first = first or err
        except Exception as err:  # noqa: BLE001 - a crash inside a check is a failure of that check
            failures.append(f"{name}: raised {type(err).__name__}: {err}")
            first = first or err
    if failures:
        raise ContractError(f"method {cls.name!r} ({cls.__module__}.{cls.__qualname__}) breaks the method contract:\n"
                            + "\n".join(f"- {f}" for f in failures)) from first


__all__ = ["CHECKS", "CLASSES", "CONTRACT_BACKBONE", "ContractError", "Subject", "check_method", "contract_backbone",
           "make_batch"]
