"""Weights: registry, verified downloads from a local HTTP server, every local format, HF parity, error messages.

Every file loaded here is created by the test (random weights); downloads are served from 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import math
import socket
import threading
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from promptclip.clip import weights as W
from promptclip.clip.architectures import ARCHITECTURES, SHAPE_FIELDS, build_random, config_from_state_dict
from promptclip.clip.model import CLIP
from promptclip.errors import PromptClipError, WeightsError
from tolerance import assert_close

EOT = 49407
SOT = 49406


def make_tokens(eot_positions=(3, 10, 76), eot=EOT, sot=SOT, seed=0) -> torch.Tensor:
    """Token rows ``[SOT, words..., EOT, 0...]`` with EOT (the largest id) at a different position in each row."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(eot_positions), 77, dtype=torch.long)
    for row, pos in enumerate(eot_positions):
        tokens[row, 0] = sot
        tokens[row, 1:pos] = torch.randint(1, min(sot, eot) - 1, (pos - 1,), generator=g)
        tokens[row, pos] = eot
    return tokens


def images_for(model: CLIP, n=2, seed=1) -> torch.Tensor:
    size = model.visual.input_resolution
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def outputs(model: CLIP, images: torch.Tensor, tokens: torch.Tensor):
    return model.encode_image(images), model.encode_text(tokens), model(images, tokens)[0]


def assert_same_outputs(a: CLIP, b: CLIP, rel=0.0):
    images, tokens = images_for(a), make_tokens()
    for x, y in zip(outputs(a, images, tokens), outputs(b, images, tokens), strict=True):
        if rel == 0.0:
            assert torch.equal(x, y)
        else:
            assert_close(x, y, rel=rel)


def assert_same_state(a: CLIP, b: CLIP):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def tiny() -> CLIP:
    return build_random("tiny")


# ------------------------------------------------------------------------------------------------ registry


EXPECTED_NAMES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14",
                  "ViT-L/14@336px"]


def test_registry_entries():
    assert W.available_models() == EXPECTED_NAMES
    assert list(W.PRETRAINED) == EXPECTED_NAMES
    for name, entry in W.PRETRAINED.items():
        assert entry.name == name
        assert entry.architecture in ARCHITECTURES
        assert entry.url.startswith("https://openaipublic.azureedge.net/clip/models/")
        # OpenAI's URLs carry the file's sha256 as the directory component.
        assert entry.url.split("/")[-2] == entry.sha256
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert entry.filename == entry.url.split("/")[-1]
        assert entry.quick_gelu is True
        assert entry.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
        assert entry.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert W.PRETRAINED["ViT-B/16"].sha256 == "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
    assert W.PRETRAINED["ViT-B/16"].filename == "ViT-B-16.pt"
    assert W.PRETRAINED["ViT-L/14@336px"].filename == "ViT-L-14-336px.pt"
    with pytest.raises(dataclasses.FrozenInstanceError):
        W.PRETRAINED["RN50"].url = "x"  # type: ignore[misc]


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "c"))
    assert W.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PROMPTCLIP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert W.cache_dir() == tmp_path / "home" / ".cache" / "promptclip"


# ------------------------------------------------------------------------------------------------ downloads


class _Server:
    def __init__(self, root):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    srv = _Server(str(root))
    srv.root = root
    yield srv
    srv.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_verify_cache_hit_and_atomic_rename(server, tmp_path):
    payload = torch.randn(1000, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    (server.root / "ViT-T-1.pt").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "cache"
    path = W.download(server.url("ViT-T-1.pt"), sha, dest, progress=True)
    assert path == dest / "ViT-T-1.pt"
    assert path.read_bytes() == payload
    assert sorted(p.name for p in dest.iterdir()) == ["ViT-T-1.pt"]  # no temporary file left
    assert server.requests == ["/ViT-T-1.pt"]
    # Cache hit: no new request.
    assert W.download(server.url("ViT-T-1.pt"), sha, dest, progress=False) == path
    assert server.requests == ["/ViT-T-1.pt"]
    # A cached file with a wrong hash is downloaded again, with a warning.
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="downloading it again"):
        again = W.download(server.url("ViT-T-1.pt"), sha, dest, progress=False)
    assert again.read_bytes() == payload
    assert len(server.requests) == 2
    assert sorted(p.name for p in dest.iterdir()) == ["ViT-T-1.pt"]


def test_download_hash_mismatch(server, tmp_path):
    payload = b"not the expected bytes" * 100
    (server.root / "RN-T.pt").write_bytes(payload)
    wrong = "0" * 64
    url = server.url("RN-T.pt")
    dest = tmp_path / "cache"
    with pytest.raises(WeightsError) as info:
        W.download(url, wrong, dest, progress=False)
    message = str(info.value)
    assert url in message
    assert wrong in message
    assert hashlib.sha256(payload).hexdigest() in message
    assert list(dest.iterdir()) == []  # the temporary file was deleted, nothing under the final name


def test_download_http_error(server, tmp_path):
    url = server.url("missing.pt")
    with pytest.raises(WeightsError, match="HTTP 404") as info:
        W.download(url, "0" * 64, tmp_path / "cache", progress=False)
    assert url in str(info.value)
    assert "does not serve this file" in str(info.value) and "--backbone /path/to/missing.pt" in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_offline(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/clip/models/{'a' * 64}/ViT-B-16.pt"
    dest = tmp_path / "cache"
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        W.download(url, "a" * 64, dest, progress=False, timeout=5)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "could not download" in message and "offline or the server is unreachable" in message
    assert url in message
    assert 'promptclip.clip.load("/path/to/ViT-B-16.pt")' in message
    assert "--backbone /path/to/ViT-B-16.pt" in message
    assert str(dest / "ViT-B-16.pt") in message and "PROMPTCLIP_CACHE" in message
    assert isinstance(info.value, PromptClipError)
    assert [p for p in dest.iterdir()] == []


def test_load_registry_name_downloads_then_loads(server, tmp_path, monkeypatch, tiny):
    torch.save(tiny.state_dict(), server.root / "tiny.pt")
    sha = hashlib.sha256((server.root / "tiny.pt").read_bytes()).hexdigest()
    entry = W.PretrainedWeights(name="Hosted/T", architecture="tiny", url=server.url("tiny.pt"), sha256=sha)
    monkeypatch.setitem(W.PRETRAINED, "Hosted/T", entry)
    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "envcache"))
    model, source = W.load_backbone("Hosted/T", progress=False)
    assert source == str(tmp_path / "envcache" / "tiny.pt")
    assert_same_state(model, tiny)
    # An explicit cache_dir wins over the environment; a second load is a cache hit.
    W.load_model("Hosted/T", cache_dir=tmp_path / "explicit", progress=False)
    W.load_model("Hosted/T", cache_dir=tmp_path / "explicit", progress=False)
    assert (tmp_path / "explicit" / "tiny.pt").is_file()
    assert server.requests == ["/tiny.pt", "/tiny.pt"]


def test_load_registry_name_offline_names_the_fix(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/{'b' * 64}/ViT-B-16.pt"
    monkeypatch.setitem(W.PRETRAINED, "ViT-B/16", W.PretrainedWeights("ViT-B/16", "ViT-B/16", url, "b" * 64))
    monkeypatch.setenv("PROMPTCLIP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="offline") as info:
        W.load_model("ViT-B/16", progress=False)
    assert str(tmp_path / "cache") in str(info.value)


# ------------------------------------------------------------------------------------------ local formats


def test_torchscript_archive_like_openai(tmp_path, tiny):
    """An archive made the way OpenAI's are: a traced CLIP with three non-weight scalar buffers."""
    traced_source = build_random("tiny")
    del traced_source.context_length  # a plain attribute in our CLIP; a buffer in OpenAI's archives
    traced_source.register_buffer("input_resolution", torch.tensor(224))
    traced_source.register_buffer("context_length", torch.tensor(77))
    traced_source.register_buffer("vocab_size", torch.tensor(49408))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(traced_source, (images_for(tiny), make_tokens()), check_trace=False)
        torch.jit.save(traced, str(tmp_path / "ViT-T.pt"))
        assert "input_resolution" in torch.jit.load(str(tmp_path / "ViT-T.pt")).state_dict()
    assert W.detect_format(tmp_path / "ViT-T.pt") == "torchscript"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # we silence torch.jit.load's deprecation notice
        loaded = W.load_model(tmp_path / "ViT-T.pt")
    assert loaded.config == ARCHITECTURES["tiny"]
    assert_same_state(loaded, tiny)
    assert_same_outputs(loaded, tiny)


def test_state_dict_pt_nested_with_module_prefix(tmp_path, tiny):
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tiny.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    loaded = W.load_model(tmp_path / "ckpt.pt", quick_gelu=True)
    assert_same_state(loaded, tiny)
    assert_same_outputs(loaded, tiny)


def test_state_dict_bin_legacy_format_under_model(tmp_path, tiny):
    torch.save({"model": dict(tiny.state_dict())}, tmp_path / "weights.bin", _use_new_zipfile_serialization=False)
    assert (tmp_path / "weights.bin").read_bytes()[:1] == b"\x80"  # a raw pickle stream, not a zip
    assert W.detect_format(tmp_path / "weights.bin") == "torch"
    assert_same_outputs(W.load_model(tmp_path / "weights.bin", quick_gelu=True), tiny)


def test_state_dict_safetensors_and_content_not_suffix(tmp_path, tiny):
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert_same_outputs(W.load_model(tmp_path / "w.safetensors", quick_gelu=True), tiny)
    # The same bytes under a misleading suffix are still read as safetensors.
    (tmp_path / "misnamed.pt").write_bytes((tmp_path / "w.safetensors").read_bytes())
    assert W.detect_format(tmp_path / "misnamed.pt") == "safetensors"
    assert_same_outputs(W.load_model(tmp_path / "misnamed.pt", quick_gelu=True), tiny)
    torch.save(tiny.state_dict(), tmp_path / "misnamed.safetensors")
    assert W.detect_format(tmp_path / "misnamed.safetensors") == "torch"
    assert_same_outputs(W.load_model(tmp_path / "misnamed.safetensors", quick_gelu=True), tiny)


def test_resnet_round_trip(tmp_path):
    rn = build_random("tiny-rn", seed=7)
    torch.save(rn.state_dict(), tmp_path / "rn.pt")
    loaded = W.load_model(tmp_path / "rn.pt", quick_gelu=True)
    assert not loaded.is_vit
    assert loaded.config == ARCHITECTURES["tiny-rn"]
    assert_same_state(loaded, rn)
    # Same weights, but oneDNN's convolution kernels may round differently for tensors at other addresses.
    assert_same_outputs(loaded, rn, rel=1e-5)


def test_fp16_checkpoint_loads_as_frozen_fp32_eval(tmp_path, tiny):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny.state_dict().items()}
    torch.save(half, tmp_path / "half.pt")
    model = W.load_model(tmp_path / "half.pt", quick_gelu=True)
    assert not model.training and all(not m.training for m in model.modules())
    params = list(model.parameters())
    assert params and all(p.dtype == torch.float32 and not p.requires_grad for p in params)
    for key, value in model.state_dict().items():
        assert torch.equal(value, half[key].float()), key


def test_plain_state_dict_needs_its_activation_stated(tmp_path, tiny):
    torch.save(tiny.state_dict(), tmp_path / "t.pt")
    with pytest.raises(WeightsError, match="does not say which activation") as info:
        W.load_model(tmp_path / "t.pt")
    assert "--gelu or --quick-gelu" in str(info.value) and "quick_gelu=True/False" in str(info.value)
    assert W.load_model(tmp_path / "t.pt", quick_gelu=True).config.quick_gelu is True
    model = W.load_model(tmp_path / "t.pt", quick_gelu=False)
    assert model.config.quick_gelu is False
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    # The activation changes the features and so the fingerprint: an adapter cannot load onto the other one.
    assert W.backbone_fingerprint(model) != W.backbone_fingerprint(tiny)


def test_random_backbones_by_name():
    for name in ("tiny", "tiny-rn", "golden-mini"):
        model, source = W.load_backbone(name)
        assert source == f"random:{name}:seed=1000"
        assert model.config == ARCHITECTURES[name]
        assert all(not p.requires_grad for p in model.parameters()) and not model.training
    assert_same_state(W.load_model("tiny"), build_random("tiny"))
    assert W.backbone_fingerprint(W.load_model("tiny", seed=5)) != W.backbone_fingerprint(W.load_model("tiny"))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_inference_for_every_architecture(name):
    config = ARCHITECTURES[name]
    with torch.device("meta"):
        state_dict = CLIP(config).state_dict()
    # The shapes give everything but the activation and the heads (width // 64 unless told otherwise).
    plain = config_from_state_dict(state_dict, quick_gelu=config.quick_gelu, vision_head_width=64)
    assert all(getattr(plain, f) == getattr(config, f) for f in SHAPE_FIELDS)
    assert plain.vision_heads == config.vision_width * (1 if config.is_vit else 32) // 64
    # The loader takes the heads of the known architecture with these shapes, silently (no assumption made).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = W.model_from_state_dict(state_dict, quick_gelu=config.quick_gelu, source=name)
    assert model.config == config
    assert model.is_vit == isinstance(config.vision_layers, int)


# ------------------------------------------------------------------------------------ Hugging Face CLIPModel

transformers = pytest.importorskip("transformers")


def hf_model(hidden_act="quick_gelu", seed=0):
    """A small transformers CLIPModel with every parameter randomised (LayerNorms included).

    HF pools the text at the *first* position of ``eos_token_id`` (argmax of the ids only when eos_token_id == 2);
    ours pools at the largest id. Token ids here stay below 998 and end with 999 == eos_token_id, the largest id
    in every row, so both implementations pool at the same position.
    """
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=1000, max_position_embeddings=77, eos_token_id=999, bos_token_id=998,
                         pad_token_id=0, hidden_act=hidden_act),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=hidden_act),
        projection_dim=48,
    )
    model = transformers.CLIPModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            r = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(r * math.prod(p.shape[1:]) ** -0.5)
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.05 * r)
    return model


def hf_outputs(model, images, tokens):
    def pooled(x):
        return x if isinstance(x, torch.Tensor) else x.pooler_output  # transformers 4 vs 5

    with torch.no_grad():
        image = pooled(model.get_image_features(pixel_values=images))
        text = pooled(model.get_text_features(input_ids=tokens))
        logits = model(input_ids=tokens, pixel_values=images).logits_per_image
    return image, text, logits


def assert_hf_parity(ours: CLIP, theirs):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokens = make_tokens((2, 9, 40, 76), eot=999, sot=998, seed=4)
    for a, b in zip(outputs(ours, images, tokens), hf_outputs(theirs, images, tokens), strict=True):
        assert a.shape == b.shape
        assert_close(a, b, rel=1e-5)
    # Sanity: the logits are not degenerate (a broken mapping would not be hidden by constant outputs).
    logits = outputs(ours, images, tokens)[2]
    assert logits.std().item() > 1e-3


@pytest.fixture(scope="module")
def hf_quick():
    return hf_model("quick_gelu")


def test_hf_folder_safetensors_parity(tmp_path, hf_quick):
    hf_quick.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert W.detect_format(tmp_path) == "hf-folder"
    ours = W.load_model(tmp_path)
    assert ours.config.quick_gelu is True
    # Heads come from config.json: 2 heads of 32 for text width 64 (OpenAI's width // 64 rule would give 1).
    assert ours.config.text_heads == 2 and ours.config.vision_heads == 2
    assert ours.config.embed_dim == 48 and ours.config.vocab_size == 1000 and ours.config.image_size == 32
    assert_hf_parity(ours, hf_quick)


def test_hf_folder_gelu_parity(tmp_path):
    theirs = hf_model("gelu", seed=1)
    theirs.save_pretrained(tmp_path)
    ours = W.load_model(tmp_path)
    assert ours.config.quick_gelu is False
    assert_hf_parity(ours, theirs)


def test_hf_folder_pytorch_model_bin(tmp_path, hf_quick):
    hf_quick.save_pretrained(tmp_path, safe_serialization=False)
    if not (tmp_path / "pytorch_model.bin").exists():
        # transformers 5 ignores safe_serialization=False and always writes model.safetensors. Write the .bin the
        # way transformers 4 did (torch.save of the state dict) so that our .bin reader is still exercised.
        (tmp_path / "model.safetensors").unlink()
        torch.save(dict(hf_quick.state_dict()), tmp_path / "pytorch_model.bin")
    assert not (tmp_path / "model.safetensors").exists()
    assert_hf_parity(W.load_model(tmp_path), hf_quick)


def test_hf_folder_sharded_with_position_ids(tmp_path, hf_quick):
    hf_quick.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    # Old transformers versions saved position_ids buffers: they must be ignored.
    tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, shard_keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in shard_keys}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(shard_keys, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_hf_parity(W.load_model(tmp_path), hf_quick)


def test_hf_mapping_function():
    width, g = 4, torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    hf = {
        "logit_scale": torch.tensor(2.0),
        "text_model.embeddings.token_embedding.weight": r(10, width),
        "text_model.embeddings.position_embedding.weight": r(7, width),
        "text_model.embeddings.position_ids": torch.arange(7)[None],
        "vision_model.embeddings.position_ids": torch.arange(5)[None],
        "text_model.final_layer_norm.weight": r(width),
        "vision_model.embeddings.class_embedding": r(width),
        "vision_model.embeddings.patch_embedding.weight": r(width, 3, 2, 2),
        "vision_model.pre_layrnorm.bias": r(width),
        "vision_model.post_layernorm.weight": r(width),
        "visual_projection.weight": r(3, width),
        "text_projection.weight": r(3, width),
    }
    for tower in ("text_model", "vision_model"):
        for part in ("q", "k", "v"):
            hf[f"{tower}.encoder.layers.1.self_attn.{part}_proj.weight"] = r(width, width)
            hf[f"{tower}.encoder.layers.1.self_attn.{part}_proj.bias"] = r(width)
        hf[f"{tower}.encoder.layers.1.self_attn.out_proj.weight"] = r(width, width)
        hf[f"{tower}.encoder.layers.1.layer_norm1.weight"] = r(width)
        hf[f"{tower}.encoder.layers.1.layer_norm2.bias"] = r(width)
        hf[f"{tower}.encoder.layers.1.mlp.fc1.weight"] = r(4 * width, width)
        hf[f"{tower}.encoder.layers.1.mlp.fc2.bias"] = r(width)
    out = W.hf_to_openai_state_dict(hf)
    expected_names = {
        "logit_scale": "logit_scale",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    }
    for ours, theirs in expected_names.items():
        assert torch.equal(out[ours], hf[theirs]), ours
    assert torch.equal(out["visual.proj"], hf["visual_projection.weight"].T)
    assert torch.equal(out["text_projection"], hf["text_projection.weight"].T)
    towers = (("text_model", "transformer.resblocks.1."), ("vision_model", "visual.transformer.resblocks.1."))
    for tower, prefix in towers:
        layer = f"{tower}.encoder.layers.1."
        w = out[prefix + "attn.in_proj_weight"]
        assert w.shape == (3 * width, width)
        assert torch.equal(w[:width], hf[layer + "self_attn.q_proj.weight"])
        assert torch.equal(w[width:2 * width], hf[layer + "self_attn.k_proj.weight"])
        assert torch.equal(w[2 * width:], hf[layer + "self_attn.v_proj.weight"])
        b = out[prefix + "attn.in_proj_bias"]
        assert torch.equal(b, torch.cat([hf[layer + f"self_attn.{p}_proj.bias"] for p in "qkv"]))
        assert torch.equal(out[prefix + "attn.out_proj.weight"], hf[layer + "self_attn.out_proj.weight"])
        assert torch.equal(out[prefix + "ln_1.weight"], hf[layer + "layer_norm1.weight"])
        assert torch.equal(out[prefix + "ln_2.bias"], hf[layer + "layer_norm2.bias"])
        assert torch.equal(out[prefix + "mlp.c_fc.weight"], hf[layer + "mlp.fc1.weight"])
        assert torch.equal(out[prefix + "mlp.c_proj.bias"], hf[layer + "mlp.fc2.bias"])
    assert not any("position_ids" in k for k in out)
    assert len(out) == len(hf) - 2 - 2 * 4  # position_ids dropped; per tower 6 q/k/v tensors become 2

    with pytest.raises(WeightsError, match="no OpenAI equivalent.*text_model.pooler.dense.weight"):
        W.hf_to_openai_state_dict({**hf, "text_model.pooler.dense.weight": r(2, 2)})
    incomplete = {k: v for k, v in hf.items() if k != "vision_model.encoder.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(WeightsError, match=r"incomplete q/k/v.*visual\.transformer\.resblocks\.1\.attn"):
        W.hf_to_openai_state_dict(incomplete)


def test_hf_folder_errors(tmp_path, hf_quick):
    hf_quick.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    # A config that disagrees with its weights.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((tmp_path / "ok" / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({**config, "projection_dim": 32}))
    with pytest.raises(WeightsError, match="embed_dim 32 in config vs 48 in the weights"):
        W.load_model(bad)
    # An unsupported activation.
    text = {**config["text_config"], "hidden_act": "gelu_new"}
    (bad / "config.json").write_text(json.dumps({**config, "text_config": text}))
    with pytest.raises(WeightsError, match="gelu_new"):
        W.load_model(bad)
    # config.json without weights.
    (bad / "model.safetensors").unlink()
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="no weights.*model.safetensors"):
        W.load_model(bad)


# ------------------------------------------------------------------------------------------------- errors


def test_error_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "ViT-B-16.pt"
    with pytest.raises(WeightsError, match="no such file or directory") as info:
        W.load_model(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(WeightsError, match="no such file or directory"):
        W.load_model("./not-here.safetensors")


def test_error_unknown_name():
    with pytest.raises(WeightsError) as info:
        W.load_model("ViT-B-16")
    message = str(info.value)
    assert "'ViT-B-16' is neither a known model name nor an existing file or folder" in message
    assert "Did you mean ViT-B/16" in message
    for name in EXPECTED_NAMES + ["tiny", "tiny-rn", "golden-mini"]:
        assert name in message


def test_error_truncated_files(tmp_path, tiny):
    state = dict(tiny.state_dict())
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    cases = [("zip.pt", 0.5), ("legacy.pt", 0.5), ("legacy.pt", 0.00001), ("w.safetensors", 0.5),
             ("w.safetensors", 0.0001)]
    for name, fraction in cases:
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut-{fraction}-{name}"
        cut.write_bytes(data[: max(9, int(len(data) * fraction))])
        with pytest.raises(WeightsError) as info:
            W.load_model(cut)
        message = str(info.value)
        assert "truncated or corrupt" in message, (name, fraction, message)
        assert str(cut) in message and f"{cut.stat().st_size:,} bytes" in message


def test_error_truncated_torchscript(tmp_path, tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(tiny.visual, images_for(tiny), check_trace=False)
        torch.jit.save(traced, str(tmp_path / "ts.pt"))
    data = (tmp_path / "ts.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        W.load_model(tmp_path / "cut.pt")
    # A complete TorchScript archive that is not a CLIP (only the image tower).
    with pytest.raises(WeightsError, match="not a CLIP state dict"):
        W.load_model(tmp_path / "ts.pt")


def test_error_unknown_format(tmp_path):
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    (tmp_path / "random.pt").write_bytes(b"\x13\x37" * 8 + noise.numpy().tobytes())
    (tmp_path / "notes.txt").write_text("these are not weights\n" * 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("random.pt", "notes.txt"):
        with pytest.raises(WeightsError) as info:
            W.load_model(tmp_path / name)
        message = str(info.value)
        assert "is not a format promptclip can read" in message and str(tmp_path / name) in message
        for accepted in ("TorchScript", "torch.save", ".safetensors", "Hugging Face CLIPModel folder"):
            assert accepted in message
    with pytest.raises(WeightsError, match="empty"):
        W.load_model(tmp_path / "empty.pt")


def test_error_folder_without_config(tmp_path, tiny):
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(tiny.state_dict(), folder / "model.pt")
    with pytest.raises(WeightsError, match="folder without config.json") as info:
        W.load_model(folder)
    assert str(folder) in str(info.value)


def test_error_missing_unexpected_and_shape_mismatch(tmp_path, tiny):
    state = dict(tiny.state_dict())
    dropped = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
    torch.save(dropped, tmp_path / "dropped.pt")
    with pytest.raises(WeightsError) as info:
        W.load_model(tmp_path / "dropped.pt", quick_gelu=True)
    message = str(info.value)
    assert "1 missing keys: visual.ln_post.bias" in message and str(tmp_path / "dropped.pt") in message
    assert "unexpected keys" not in message and "shape" not in message

    torch.save({**state, "visual.extra_head.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match="1 unexpected keys: visual.extra_head.weight"):
        W.load_model(tmp_path / "extra.pt", quick_gelu=True)

    torch.save({**state, "ln_final.bias": torch.zeros(5)}, tmp_path / "shape.pt")
    with pytest.raises(WeightsError, match=r"shape mismatches: ln_final.bias: file \(5,\) vs model \(128,\)"):
        W.load_model(tmp_path / "shape.pt", quick_gelu=True)


def test_error_many_missing_keys_are_previewed(tmp_path, tiny):
    # Layer 1 of both towers keeps only ln_1.weight (so 2 layers are still inferred): 2 x 11 keys are missing.
    dropped = [k for k in tiny.state_dict() if ".resblocks.1." in k and not k.endswith("ln_1.weight")]
    assert len(dropped) == 22
    torch.save({k: v for k, v in tiny.state_dict().items() if k not in dropped}, tmp_path / "partial.pt")
    with pytest.raises(WeightsError) as info:
        W.load_model(tmp_path / "partial.pt", quick_gelu=True)
    message = str(info.value)
    assert "22 missing keys: " in message and "(22 in all)" in message
    listed = message.split("22 missing keys: ")[1].split(", ... (22 in all)")[0].split(", ")
    assert len(listed) == 20 and set(listed) <= set(dropped)


def test_error_not_clip(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, tmp_path / "linear.pt")
    with pytest.raises(WeightsError, match="not a CLIP state dict in OpenAI layout") as info:
        W.load_model(tmp_path / "linear.pt")
    assert "fc.weight" in str(info.value) and str(tmp_path / "linear.pt") in str(info.value)
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(WeightsError, match="not tensors"):
        W.load_model(tmp_path / "meta.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        W.load_model(tmp_path / "list.pt")


def test_error_pickled_module_is_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(WeightsError, match="pickled Python objects") as info:
        W.load_model(tmp_path / "module.pt")
    assert "state_dict()" in str(info.value)


# --------------------------------------------------------------------------------------------- fingerprint


def reference_fingerprint(state_dict, samples=64) -> str:
    """The documented rule, written independently: key, shape, evenly spaced values + the last, as float32."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        flat = state_dict[key].detach().reshape(-1).float()
        digest.update(key.encode())
        digest.update(repr(tuple(state_dict[key].shape)).encode())
        if flat.numel():
            n = min(samples, flat.numel())
            picks = [i * flat.numel() // n for i in range(n)] + [flat.numel() - 1]
            digest.update(b"".join(flat[i].numpy().astype("<f4").tobytes() for i in picks))
    return digest.hexdigest()[:16]


def test_fingerprint(tmp_path, tiny):
    fp = W.backbone_fingerprint(tiny)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == reference_fingerprint(tiny.state_dict())
    assert W.backbone_fingerprint(tiny.state_dict()) == fp
    torch.save(tiny.state_dict(), tmp_path / "t.pt")
    assert W.backbone_fingerprint(W.load_model(tmp_path / "t.pt", quick_gelu=True)) == fp
    assert W.backbone_fingerprint(build_random("tiny", seed=1)) != fp
    changed = {k: v.clone() for k, v in tiny.state_dict().items()}
    changed["ln_final.weight"][0] += 1e-3
    assert W.backbone_fingerprint(changed) != fp
    rn = build_random("tiny-rn")
    assert W.backbone_fingerprint(rn) == reference_fingerprint(rn.state_dict())


def test_fingerprint_is_fast_for_vit_b16():
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIP(ARCHITECTURES["ViT-B/16"]).state_dict().items()}
    state = {k: torch.empty(s) for k, s in shapes.items()}  # ~150M values, never touched in full
    start = time.perf_counter()
    W.backbone_fingerprint(state)
    assert time.perf_counter() - start < 1.0
