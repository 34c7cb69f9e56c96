"""The frozen image-feature cache (promptclip.features): exact reuse across a grid, re-encoding of changed files,
namespaces, the size bound, concurrent writers, and the CLI switch."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from promptclip.cli import main
from promptclip.clip.architectures import build_random
from promptclip.clip.transforms import EvalTransform
from promptclip.data import ImageDataset, Record, load_splits
from promptclip.features import FeatureCache, frozen_features, image_key, namespace
from promptclip.protocols import Backbone, RunOptions, run_protocol

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FROZEN_METHODS = ["zeroshot", "coop", "cocoop", "kgcoop"]


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny").requires_grad_(False)


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """Six images of the bundled sample, copied so that a test may change them."""
    records = load_splits("eurosat-sample").test[:6]
    paths = []
    for i, rec in enumerate(records):
        paths.append(tmp_path / "images" / f"{i}.jpg")
        paths[-1].parent.mkdir(exist_ok=True)
        shutil.copy(rec.path, paths[-1])
    return paths


def dataset_of(paths, size=224, **transform) -> ImageDataset:
    records = [Record(str(p), i % 2, f"class {i % 2}", p.name) for i, p in enumerate(paths)]
    return ImageDataset(records, EvalTransform(size, **transform))


def encode(tiny, data, cache, fingerprint="fp", precision="fp32", batch_size=4):
    return frozen_features(tiny, data, cache, fingerprint, batch_size=batch_size, precision=precision, progress=False)


def direct_features(tiny, data, batch_size=4) -> torch.Tensor:
    """The image tower on the dataset in batches of ``batch_size`` (the batches of ``encode``), no cache."""
    pixels = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        return torch.cat([tiny.encode_image(part) for part in pixels.split(batch_size)])


# -- exactness across a grid -----------------------------------------------------------------------------------------


def run_grid(out: Path, backbone: Backbone, cache: FeatureCache | None) -> tuple[list[dict], list[str]]:
    log: list[str] = []
    # One evaluation precision for every method (zero-shot has no training preset to take it from).
    options = RunOptions(progress=False, log=log.append, feature_cache=cache, precision="fp32")
    grid = run_protocol("base2novel", ["eurosat-sample"], FROZEN_METHODS, backbone, out, seeds=[1, 2], shots=[4],
                        overrides=["train.max_epoch=1", "train.precision=fp32"], options=options)
    return grid.records, log


def test_grid_records_and_adapters_are_identical_with_and_without_the_cache(tiny, tmp_path):
    backbone = Backbone(tiny, "tiny", "tiny-fingerprint", random_weights=True)
    plain, _ = run_grid(tmp_path / "plain", backbone, None)
    cache = FeatureCache(tmp_path / "features")
    cached, log = run_grid(tmp_path / "cached", backbone, cache)

    varying = {"run_dir", "seconds", "created"}
    assert [{k: v for k, v in r.items() if k not in varying} for r in cached] == \
        [{k: v for k, v in r.items() if k not in varying} for r in plain]
    assert len(cached) == len(FROZEN_METHODS) * 2 * 2  # methods x seeds x (base, novel)
    for a, b in zip(plain, cached, strict=True):
        adapter = Path(a["run_dir"]) / "adapter.safetensors"
        if adapter.exists():  # zero-shot learns nothing
            theirs = load_file(Path(b["run_dir"]) / "adapter.safetensors")
            assert {k: v.tolist() for k, v in load_file(adapter).items()} == {k: v.tolist() for k, v in theirs.items()}

    # Every distinct test image went through the image tower once, at the first cell's evaluation.
    stats = [line for line in log if "image features" in line]
    assert len(stats) == len(cached)
    encoded = sum(int(line.split(", ")[1].split()[0]) for line in stats)
    splits = load_splits("eurosat-sample")
    assert encoded == len({rec.path for rec in splits.test}) == 300
    assert stats[0].endswith(f"0 from the cache, 150 encoded ({cache.root})")
    assert all(" 150 from the cache, 0 encoded" in line for line in stats[2:])


# -- staleness and keys ----------------------------------------------------------------------------------------------


def test_a_changed_image_file_is_encoded_again(tiny, images, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    data = dataset_of(images)
    first, stats = encode(tiny, data, cache)
    assert (stats.hits, stats.encoded) == (0, 6)
    again, stats = encode(tiny, data, cache)
    assert (stats.hits, stats.encoded) == (6, 0)
    assert all(torch.equal(again[i]["image_features"], first[i]["image_features"]) for i in range(6))
    assert torch.equal(torch.stack([first[i]["image_features"] for i in range(6)]), direct_features(tiny, data))

    with Image.open(images[2]) as im:  # same name, same size on disk or not: the bytes decide
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images[2])
    changed, stats = encode(tiny, data, cache)
    assert (stats.hits, stats.encoded) == (5, 1)
    fresh = direct_features(tiny, data)[2]  # encoded alone, against a batch of 4 here: equal to rounding
    torch.testing.assert_close(changed[2]["image_features"], fresh, rtol=0, atol=1e-5 * float(fresh.abs().max()))
    assert not torch.allclose(changed[2]["image_features"], first[2]["image_features"])


def test_features_are_keyed_by_backbone_precision_and_transform(tiny, images, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    assert encode(tiny, dataset_of(images), cache)[1].encoded == 6
    assert encode(tiny, dataset_of(images), cache, fingerprint="another backbone")[1].encoded == 6
    assert encode(tiny, dataset_of(images), cache, precision="bf16")[1].encoded == 6
    assert encode(tiny, dataset_of(images, mean=(0.5, 0.5, 0.5)), cache)[1].encoded == 6
    assert len(list(cache.root.glob("*/namespace.json"))) == 4
    description = json.loads(next(cache.root.glob("*/namespace.json")).read_text())
    assert {"backbone_fingerprint", "transform", "precision", "device", "torch"} <= set(description)
    # A copy of an image is the same image; a custom (non-dataclass) transform is never cached.
    shutil.copy(images[0], images[0].with_name("copy.jpg"))
    assert encode(tiny, dataset_of([images[0].with_name("copy.jpg")]), cache)[1].hits == 1
    assert namespace("fp", lambda image, generator=None: image, "fp32", "cpu") is None


def test_a_missing_image_is_a_data_error_naming_it(tmp_path):
    from promptclip.errors import DataError

    with pytest.raises(DataError, match="gone.jpg"):
        image_key(tmp_path / "gone.jpg")


# -- bounded size, corruption, concurrency ---------------------------------------------------------------------------


def test_the_cache_evicts_least_recently_used_chunks_beyond_its_size(tmp_path):
    space = {"format": 1, "test": "lru"}
    cache = FeatureCache(tmp_path / "cache", max_bytes=10**9)
    chunks = []
    for n in range(3):
        chunks.append(cache.store(space, [bytes([n]) * 16], torch.full((1, 256), float(n))))
        os.utime(chunks[-1], (1000 + n, 1000 + n))  # explicit use order: chunk 0 oldest
    assert cache.lookup(space, {bytes([0]) * 16})  # a hit on chunk 0 makes it the most recently used
    size = chunks[0].stat().st_size
    bounded = FeatureCache(cache.root, max_bytes=2 * size)
    bounded.evict()
    assert [c.exists() for c in chunks] == [True, False, True]
    assert bounded.size_bytes() <= 2 * size
    FeatureCache(cache.root, max_bytes=0).evict()
    assert not any(c.exists() for c in chunks)


def test_an_unreadable_chunk_is_a_miss_not_an_error(tiny, images, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    encode(tiny, dataset_of(images), cache)
    chunk = cache.chunks()[0]
    chunk.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="is damaged .it cannot be read"):
        assert encode(tiny, dataset_of(images), cache)[1].encoded == 6
    assert not chunk.exists()


def flip_feature_bytes(chunk: Path) -> None:
    """Flip the sign bit of every fp32 feature value in place: same size, still a valid safetensors file."""
    data = bytearray(chunk.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_size])["features"]["data_offsets"]
    for offset in range(8 + header_size + start + 3, 8 + header_size + end, 4):
        data[offset] ^= 0x80
    chunk.write_bytes(bytes(data))


def test_a_chunk_with_flipped_bytes_is_warned_about_once_removed_and_encoded_again(tiny, images, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    data = dataset_of(images)
    encode(tiny, data, cache)
    chunk = cache.chunks()[0]
    flip_feature_bytes(chunk)
    assert load_file(chunk)["features"].shape == (6, 64)  # still readable: only the checksum tells
    with pytest.warns(UserWarning, match="is damaged .its checksum does not match") as caught:
        again, stats = encode(tiny, data, cache)
    assert len(caught) == 1 and stats.encoded == 6 and not chunk.exists()
    expected = direct_features(tiny, data)
    assert torch.equal(torch.stack([again[i]["image_features"] for i in range(6)]), expected)
    assert encode(tiny, data, cache)[1].hits == 6  # the new chunk is sound


def test_a_chunk_without_this_format_is_a_miss(tiny, images, tmp_path):
    from safetensors.torch import save_file

    cache = FeatureCache(tmp_path / "cache")
    encode(tiny, dataset_of(images), cache)
    chunk = cache.chunks()[0]
    save_file(load_file(chunk), chunk)  # the same tensors without format and checksum, as format 1 wrote them
    assert encode(tiny, dataset_of(images), cache)[1].encoded == 6


def test_a_read_only_cache_serves_its_hits_and_warns_once(tiny, images, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    encode(tiny, dataset_of(images[:3]), FeatureCache(cache_dir))
    before = {p: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()}
    cache_dir.chmod(0o555)
    for sub in cache_dir.iterdir():
        sub.chmod(0o555)
    try:
        if os.access(cache_dir, os.W_OK):  # root ignores the mode: make the write check see a read-only mount
            from promptclip.errors import ConfigError

            def read_only(path, directory=True):
                raise ConfigError(f"{path} is not writable (Read-only file system)")

            monkeypatch.setattr("promptclip.features.check_output_location", read_only)
        cache = FeatureCache(cache_dir)
        with pytest.warns(UserWarning, match="is not writable.*new features will not be stored") as caught:
            first = encode(tiny, dataset_of(images), cache)[1]
            second = encode(tiny, dataset_of(images), cache)[1]
        assert len(caught) == 1
        assert (first.hits, first.encoded) == (second.hits, second.encoded) == (3, 3)
        assert {p: p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()} == before
    finally:
        for sub in cache_dir.iterdir():
            sub.chmod(0o755)
        cache_dir.chmod(0o755)


WORKER = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from promptclip.clip.architectures import build_random
from promptclip.clip.transforms import EvalTransform
from promptclip.data import ImageDataset, Record
from promptclip.features import FeatureCache, frozen_features
paths = sorted(Path(sys.argv[1]).glob("*.jpg"))
data = ImageDataset([Record(str(p), 0, "c", p.name) for p in paths], EvalTransform(224))
start = float(sys.argv[3])
import time
time.sleep(max(0.0, start - time.time()))
out, stats = frozen_features(build_random("tiny").requires_grad_(False), data, FeatureCache(Path(sys.argv[2])),
                             "fp", batch_size=4, precision="fp32", progress=False)
torch.save(torch.stack([out[i]["image_features"] for i in range(len(data))]), sys.argv[4])
"""


def test_concurrent_workers_share_the_cache_without_locks(tiny, images, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    start = time.time() + 4  # both processes import torch first, then encode at the same moment
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(images[0].parent), str(cache.root), str(start),
                                 str(tmp_path / f"out{i}.pt")], env={**os.environ, "OMP_NUM_THREADS": "1"})
               for i in range(2)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    a, b = torch.load(tmp_path / "out0.pt"), torch.load(tmp_path / "out1.pt")
    assert torch.equal(a, b)
    assert not list(cache.root.glob("*/.*.tmp"))  # every write was completed and renamed
    data = dataset_of(sorted(images))
    out, stats = encode(tiny, data, cache)
    assert (stats.hits, stats.encoded) == (6, 0)
    assert torch.equal(torch.stack([out[i]["image_features"] for i in range(6)]), a)


# -- command line ----------------------------------------------------------------------------------------------------


def test_eval_command_reuses_features_and_can_turn_the_cache_off(tmp_path, capsys):
    argv = ["eval", "--method", "zeroshot", "--dataset", "eurosat-sample", "--backbone", "tiny", "--quiet",
            "--feature-cache", str(tmp_path / "features")]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "0 from the cache, 300 encoded" in first
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "300 from the cache, 0 encoded" in second
    accuracy = json.loads(first[first.index("{"):])["accuracy"]
    assert json.loads(second[second.index("{"):])["accuracy"] == accuracy
    assert main([*argv[:-2], "--feature-cache", "off"]) == 0
    off = capsys.readouterr().out
    assert "image features" not in off and json.loads(off[off.index("{"):])["accuracy"] == accuracy
