"""The caption pipeline end to end with tiny randomly initialised MLLMs (no download): a LLaVA (chat template) and a
BLIP (text prefix) built from transformers configs with an in-code vocabulary and saved with save_pretrained; cache
resume after a kill, user caption files, verification, label-leak check and masking, and the CLI."""

from __future__ import annotations

import builtins
import csv
import json
from pathlib import Path

import pytest
import torch

from promptclip.captions import (
    CacheWriter,
    CaptionExtras,
    CaptionSet,
    HFCaptioner,
    build_captions,
    dataset_items,
    leak_report,
    load_captions,
    mask_class_names,
    mentions,
    verify_captions,
)
from promptclip.captions.store import read_caption_file
from promptclip.cli import main
from promptclip.data import load_splits
from promptclip.errors import ConfigError, DataError

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["a", "the", "of", "with", "and", "green", "brown", "grey", "blue", "dark", "bright", "field", "fields",
         "forest", "river", "road", "houses", "water", "trees", "texture", "pattern", "lines", "small", "large",
         "aerial", "view", "image", "photo", "picture", "describe", "this", "in", "one", "or", "two", "sentences",
         "."] + [f"w{i}" for i in range(30)]


def _word_tokenizer(special: list[str], **kwargs):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*special, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs), vocab


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == "
                 "'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def build_tiny_llava(path: Path, seed: int = 0) -> Path:
    """A 2-layer LLaVA (CLIP vision tower + Llama decoder, width 32) with a chat template, saved to ``path``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    special = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"]
    tokenizer, vocab = _word_tokenizer(special, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                       eos_token="</s>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_blip(path: Path, seed: int = 0) -> Path:
    """A 2-layer BLIP captioner (width 32, 32x32 images) without a chat template, saved to ``path``."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]))
    tokenizer = BertTokenizer(str(path / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "intermediate_size": 64, "encoder_hidden_size": 32,
                     "max_position_embeddings": 64, "bos_token_id": tokenizer.bos_token_id,
                     "pad_token_id": tokenizer.pad_token_id, "sep_token_id": tokenizer.sep_token_id},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 8, "projection_dim": 32},
        projection_dim=32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("mllm") / "tiny-llava")


@pytest.fixture(scope="module")
def llava(llava_dir) -> HFCaptioner:
    return HFCaptioner(str(llava_dir), max_new_tokens=6, local_files_only=True)


@pytest.fixture(scope="module")
def sample():
    return load_splits("eurosat-sample")


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- generation ------------------------------------------------------------------------------------------------------


def test_cli_build_captions_a_dataset_split_with_provenance(llava_dir, sample, tmp_path, capsys):
    out = tmp_path / "val.jsonl"
    argv = ["captions", "build", "--dataset", "eurosat-sample", "--splits", "val", "--model", str(llava_dir),
            "--out", str(out), "--batch-size", "16", "--max-new-tokens", "5", "--local-files-only", "--quiet"]
    assert main(argv) == 0
    lines = lines_of(out)
    assert sorted(line["key"] for line in lines) == sorted(r.relpath for r in sample.val)
    first = lines[0]
    assert first["model"] == str(llava_dir) and first["prompt_style"] == "chat" and first["source"] == "generated"
    assert first["generation"] == {"max_new_tokens": 5, "num_beams": 1, "do_sample": False, "dtype": "float32"}
    assert len({line["instruction_sha256"] for line in lines}) == 1 and len(first["instruction_sha256"]) == 64
    assert "label" not in first["instruction"].lower() and "forest" not in first["instruction"].lower()
    captions = [line["caption"] for line in lines]
    assert all(isinstance(c, str) and 0 < len(c.split()) <= 5 for c in captions)
    assert not any(c.startswith(("USER", "ASSISTANT")) for c in captions)  # the prompt is cut off
    assert len(set(captions)) > 1  # they depend on the image
    assert "40 generated" in capsys.readouterr().out
    # a second run has nothing to do
    assert main(argv) == 0
    assert len(lines_of(out)) == 40 and "0 generated" in capsys.readouterr().out


def test_an_image_gets_the_same_caption_alone_or_in_a_batch(llava, sample):
    from promptclip.data import open_image

    images = [open_image(r.path) for r in sample.val[:4]]
    together = llava.caption(images)
    assert [llava.caption([im])[0] for im in images] == together


def test_blip_style_prefix_and_unconditional_captioning(tmp_path, sample):
    from promptclip.data import open_image

    path = build_tiny_blip(tmp_path / "tiny-blip")
    images = [open_image(r.path) for r in sample.test[:3]]
    auto = HFCaptioner(str(path), max_new_tokens=4, local_files_only=True)
    assert auto.prompt_style == "none" and auto.provenance["instruction"] == ""  # no chat template
    assert len(auto.caption(images)) == 3
    prefixed = HFCaptioner(str(path), instruction="a photo of", prompt_style="prefix", max_new_tokens=4,
                           local_files_only=True)
    assert all(c.startswith("a photo of") for c in prefixed.caption(images))
    assert prefixed.provenance["instruction_sha256"] != auto.provenance["instruction_sha256"]
    with pytest.raises(ConfigError, match="no chat template"):
        HFCaptioner(str(path), prompt_style="chat", local_files_only=True)


def test_killed_build_resumes_without_duplicates(llava, sample, tmp_path):
    out = tmp_path / "cache.jsonl"
    items = dataset_items("eurosat-sample", splits=["val"])[:20]

    class Killed(Exception):
        pass

    def kill(done):
        raise Killed

    with pytest.raises(Killed):
        build_captions(items, out, llava, batch_size=6, progress=False, on_batch=kill)
    first = lines_of(out)
    assert [line["key"] for line in first] == [it.key for it in items[:6]]
    with open(out, "ab") as handle:  # a second kill in the middle of a write leaves a torn line
        handle.write(b'{"key": "AnnualCrop/torn.jpg", "capt')
    with pytest.warns(UserWarning, match="torn last line"):
        result = build_captions(items, out, llava, batch_size=6, progress=False)
    assert (result.already, result.generated, result.total) == (6, 14, 20)
    lines = lines_of(out)
    keys = [line["key"] for line in lines]
    assert len(keys) == len(set(keys)) == 20 and set(keys) == {it.key for it in items}
    assert lines[:6] == first  # finished captions were kept, not regenerated
    # the resumed captions are the ones an uninterrupted run makes
    fresh = tmp_path / "fresh.jsonl"
    build_captions(items, fresh, llava, batch_size=20, progress=False)
    assert {d["key"]: d["caption"] for d in lines_of(fresh)} == {d["key"]: d["caption"] for d in lines}


def test_a_cache_refuses_captions_of_another_configuration(llava_dir, tmp_path):
    out = tmp_path / "cache.jsonl"
    items = dataset_items("eurosat-sample", splits=["val"])[:2]
    build_captions(items, out, HFCaptioner(str(llava_dir), max_new_tokens=3, local_files_only=True),
                   progress=False)
    other = HFCaptioner(str(llava_dir), max_new_tokens=4, local_files_only=True)
    with pytest.raises(ConfigError, match="another configuration"):
        build_captions(items, out, other, progress=False)
    other = HFCaptioner(str(llava_dir), instruction="What is in this picture?", max_new_tokens=3,
                        local_files_only=True)
    with pytest.raises(ConfigError, match="another --out"):
        build_captions(items, out, other, progress=False)


def test_missing_transformers_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ConfigError, match=r"promptclip\[hf\]"):
        HFCaptioner("any/model")


def test_unknown_model_path_is_a_clear_error(tmp_path, capsys):
    code = main(["captions", "build", "--dataset", "eurosat-sample", "--model", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "c.jsonl"), "--local-files-only"])
    err = capsys.readouterr().err.replace("\n", " ")
    assert code == 2 and f"captioning model folder {tmp_path / 'nope'} does not exist" in err
    assert not (tmp_path / "c.jsonl").exists()


def test_a_cache_writer_creates_nothing_before_its_first_caption(tmp_path):
    path = tmp_path / "new" / "c.jsonl"
    with CacheWriter(path):
        pass  # e.g. the captioning model failed to load
    assert not (tmp_path / "new").exists()
    with CacheWriter(path) as writer:
        writer.append([{"path": "a.jpg", "caption": "a photo"}])
    assert json.loads(path.read_text()) == {"path": "a.jpg", "caption": "a photo"}


# -- user files, lookup, verification -----------------------------------------------------------------------------


def test_user_csv_and_jsonl_captions_are_accepted(sample, tmp_path):
    train = sample.train[:3]
    csv_path = tmp_path / "mine.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        writer.writerow([train[0].relpath, "green fields, with a road"])
        writer.writerow([train[1].path, "a dark, wooded area"])  # absolute paths work too
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(json.dumps({"path": train[2].relpath, "caption": "blue water"}) + "\n")
    headerless = tmp_path / "plain.csv"
    headerless.write_text(f"{train[0].relpath},green fields\n")
    captions = load_captions([csv_path, jsonl])
    assert [captions.lookup(r) for r in train] == ["green fields, with a road", "a dark, wooded area", "blue water"]
    assert load_captions(headerless).lookup(train[0]) == "green fields"
    extras = CaptionExtras(captions)
    with pytest.warns(UserWarning, match="1 of 4 images have no caption"):
        values = extras([*train, sample.train[3]])
    assert values == {"caption": [*[captions.lookup(r) for r in train], None]}
    assert captions.lookup_file(train[0].path) == "green fields, with a road"  # predict: any path to the file


def test_conflicting_captions_and_bad_lines_are_errors_naming_the_line(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"key": "x/1.jpg", "caption": "one"}) + "\n")
    b.write_text(json.dumps({"key": "x/1.jpg", "caption": "two"}) + "\n")
    with pytest.raises(DataError, match="two different captions"):
        load_captions([a, b])
    assert len(load_captions([a, a])) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "x/1.jpg"}\n{"key": "x/2.jpg", "caption": "ok"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no 'caption'"):
        read_caption_file(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_captions(tmp_path / "missing.jsonl")


def test_verify_reports_coverage_missing_images_and_provenance(llava, sample, tmp_path, capsys):
    out = tmp_path / "cache.jsonl"
    build_captions(dataset_items("eurosat-sample", splits=["val"]), out, llava, batch_size=40, progress=False)
    report = verify_captions(out, "eurosat-sample", splits=["val"])
    assert report.ok and report.coverage == {"val": (40, 40)} and report.mismatched == 0
    report = verify_captions(out, "eurosat-sample", splits=["val", "test"])
    assert not report.complete and report.coverage["test"] == (0, 300)
    # an entry whose image is gone, and one made by another model
    ghost = {**lines_of(out)[0], "key": "Forest/Forest_999999.jpg", "path": "/nowhere/Forest_999999.jpg"}
    other = {**lines_of(out)[1], "key": sample.test[0].relpath, "path": sample.test[0].path, "model": "other/m"}
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps(ghost) + "\n" + json.dumps(other) + "\n")
    report = verify_captions([out, extra], "eurosat-sample", splits=["val"])
    assert report.absent_images == ["Forest/Forest_999999.jpg"] and report.mismatched == 1
    assert main(["captions", "verify", str(out), "--dataset", "eurosat-sample", "--splits", "val"]) == 0
    assert "val   40/40 images captioned" in capsys.readouterr().out
    assert main(["captions", "verify", str(out), "--dataset", "eurosat-sample", "--splits", "val",
                 "--model", "someone/else"]) == 1
    assert "PROVENANCE MISMATCH: 40" in capsys.readouterr().out
    assert main(["captions", "verify", str(out), "--dataset", "eurosat-sample"]) == 1
    assert "MISSING 300" in capsys.readouterr().out


# -- label leakage -------------------------------------------------------------------------------------------------


def test_leak_check_counts_ground_truth_mentions(sample):
    records = [r for r in sample.test if r.classname in ("Forest", "River", "Sea or Lake")][:6]
    texts = {"Forest": "a dense FOREST with trees", "River": "a winding river_bed", "Sea or Lake": "blue sea-or-lake"}
    captions = CaptionSet()
    from promptclip.captions.store import CaptionEntry

    for i, rec in enumerate(records):
        text = texts[rec.classname] if i % 2 == 0 else "a forest next to houses"
        captions.add(CaptionEntry(key=rec.relpath, caption=text))
    report = leak_report(records, captions, sample.classnames)
    truth = sum(1 for i, r in enumerate(records) if i % 2 == 0 or r.classname == "Forest")
    assert report.checked == 6 and report.mention_true_class == truth and report.mention_any_class == 6
    assert "mention their ground-truth class name" in str(report)
    assert mentions("two rivers meet", "River") and not mentions("riverside path", "River")


def test_mask_replaces_every_class_name_and_keeps_provenance(sample, tmp_path, capsys):
    assert mask_class_names("Sea or Lake near a forest, forests and a river", sample.classnames) == (
        "something near a something, something and a something", 4)
    src = tmp_path / "c.jsonl"
    rec = sample.test[0]
    src.write_text(json.dumps({"key": rec.relpath, "caption": "an annual crop land beside a Highway or Road",
                               "model": "m", "source": "generated"}) + "\n")
    out = tmp_path / "masked.jsonl"
    assert main(["captions", "mask", str(src), "--dataset", "eurosat-sample", "--out", str(out)]) == 0
    line = lines_of(out)[0]
    assert line["caption"] == "an something beside a something" and line["model"] == "m"
    assert line["masked"]["dataset"] == "eurosat-sample" and line["masked"]["token"] == "something"
    assert "masked 2 class-name mentions in 1 of 1" in capsys.readouterr().out
    report = verify_captions(out, "eurosat-sample", splits=["test"])
    assert report.leak.mention_true_class == 0
