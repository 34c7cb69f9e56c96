"""CLIP BPE tokenizer: known ids, parity with the reference goldens' tokenized prompts, cleaning and edge cases."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from promptclip.clip.tokenizer import (
    ContextLengthError,
    SimpleTokenizer,
    VocabularyError,
    default_vocab_path,
    get_tokenizer,
    tokenize,
)
from promptclip.errors import PromptClipError

GOLDEN_DIR = Path(__file__).parent / "golden"
TOKENS_KEY = "input.tokenized_prompts"
SOT, EOT, PERIOD = 49406, 49407, 269


def _goldens_with_tokens() -> list[Path]:
    found = []
    for path in sorted(GOLDEN_DIR.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if TOKENS_KEY in f.keys():
                found.append(path)
    return found


GOLDENS = _goldens_with_tokens()


def _golden(path: Path) -> tuple[torch.Tensor, dict]:
    meta = json.loads(path.with_suffix(".json").read_text())
    return load_file(str(path))[TOKENS_KEY], meta


#: Reference trainers that put class names into prompts as given, without ``name.replace("_", " ")`` (the golden
#: README: RPO's prompts keep "industrial_buildings").
KEEP_UNDERSCORES = {"RPO"}


def _classnames(meta: dict) -> list[str]:
    names = meta["inputs"]["classnames"]
    if meta["provenance"].get("trainer_class") in KEEP_UNDERSCORES:
        return list(names)
    return [name.replace("_", " ") for name in names]


def _coop_prefix(trainer: dict) -> str:
    ctx_init = trainer.get("CTX_INIT")
    if isinstance(ctx_init, str) and ctx_init:
        return ctx_init.replace("_", " ")
    return " ".join(["X"] * trainer["N_CTX"])


def _maple_family_prefix(trainer: dict, n_ctx_key: str) -> str:
    # MaPLe/IVLP/PromptSRC/CMPA keep the init words only for short contexts (golden README).
    n_ctx = trainer[n_ctx_key]
    ctx_init = trainer.get("CTX_INIT")
    if isinstance(ctx_init, str) and ctx_init and n_ctx <= 4:
        return ctx_init.replace("_", " ")
    return " ".join(["X"] * n_ctx)


PREFIX_RULES = {
    "CoOp": _coop_prefix,
    "CoCoOp": _coop_prefix,
    "MaPLe": lambda trainer: _maple_family_prefix(trainer, "N_CTX"),
    "CMPA": lambda trainer: _maple_family_prefix(trainer, "N_CTX"),
    "IVLP": lambda trainer: _maple_family_prefix(trainer, "N_CTX_TEXT"),
    "PromptSRC": lambda trainer: _maple_family_prefix(trainer, "N_CTX_TEXT"),
}


def _trainer_class(path: Path) -> str | None:
    """The Dassl trainer a golden comes from (None for references with their own format, e.g. Tip-Adapter)."""
    return json.loads(path.with_suffix(".json").read_text())["provenance"].get("trainer_class")


GOLDENS_WITH_PROMPT_RULE = [p for p in GOLDENS if _trainer_class(p) in PREFIX_RULES]


@pytest.fixture(scope="module")
def tok() -> SimpleTokenizer:
    return get_tokenizer()


def test_special_ids_and_vocab_size(tok):
    assert (tok.sot_id, tok.eot_id, tok.vocab_size) == (SOT, EOT, 49408)


def test_known_sentence(tok):
    assert tok.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    assert tokenize("a photo of a cat.")[0, :9].tolist() == [SOT, 320, 1125, 539, 320, 2368, 269, EOT, 0]


def test_golden_files_found():
    assert GOLDENS, f"no golden with {TOKENS_KEY} in {GOLDEN_DIR}"
    assert any(_trainer_class(p) == "CoOp" for p in GOLDENS_WITH_PROMPT_RULE)


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: p.stem)
def test_golden_rows_end_with_class_name(path, tok):
    tokens, meta = _golden(path)
    names = _classnames(meta)
    assert tokens.shape[0] == len(names)
    for row, name in zip(tokens.tolist(), names, strict=True):
        eot = row.index(EOT)
        tail = [*tok.encode(name), PERIOD]
        assert row[0] == SOT
        assert row[eot - len(tail) : eot] == tail, name
        assert all(t == 0 for t in row[eot + 1 :])


@pytest.mark.parametrize("path", GOLDENS_WITH_PROMPT_RULE, ids=lambda p: p.stem)
def test_golden_full_prompts(path):
    tokens, meta = _golden(path)
    prefix = PREFIX_RULES[meta["provenance"]["trainer_class"]](meta["cfg"]["trainer"])
    prompts = [f"{prefix} {name}." for name in _classnames(meta)]
    ours = tokenize(prompts, context_length=tokens.shape[1])
    assert ours.dtype == torch.long
    assert torch.equal(ours, tokens.to(torch.long))


@pytest.mark.parametrize(
    "text", ["a photo of a dog", "the quick brown fox jumps over the lazy dog", "industrial buildings"]
)
def test_decode_round_trip_of_words(tok, text):
    assert tok.decode(tok.encode(text)) == text + " "


@pytest.mark.parametrize(
    "text", ["Hello, World! It's 2024.", "naïve café", "日本語のテキスト 🙂👍🏽", "e=mc^2 (approx.) #tag @user"]
)
def test_encode_is_stable_through_decode(tok, text):
    ids = tok.encode(text)
    assert ids
    assert tok.encode(tok.decode(ids)) == ids
    assert tok.decode(ids).replace(" ", "") == text.lower().replace(" ", "")


def test_punctuation_is_split_and_spaced_on_decode(tok):
    assert tok.decode(tok.encode("hello, world!")) == "hello , world ! "


@pytest.mark.parametrize(
    ("messy", "clean"),
    [
        ("fish &amp; chips", "fish & chips"),
        ("fish &amp;amp; chips", "fish & chips"),
        ("<b> fish &amp;amp; chips", "<b> fish & chips"),  # ftfy leaves markup alone; html.unescape runs twice
        ("cafÃ©", "café"),  # mojibake repaired by ftfy
        ("  a\n\tphoto \u00a0  of\r\n", "a photo of"),
        ("A PHOTO Of", "a photo of"),
    ],
)
def test_text_cleaning(tok, messy, clean):
    assert tok.encode(messy) == tok.encode(clean)


def test_html_is_unescaped_exactly_twice(tok):
    assert "amp" not in tok.decode(tok.encode("<b> fish &amp;amp; chips"))
    assert "amp" in tok.decode(tok.encode("<b> fish &amp;amp;amp; chips"))  # one level of escaping survives


def test_digits_are_single_tokens(tok):
    assert tok.encode("2024") == [tok.encode(d)[0] for d in "2024"]


def test_special_token_strings(tok):
    assert tok.encode("<|startoftext|>a<|endoftext|>") == [SOT, *tok.encode("a"), EOT]


def test_tokenize_batches_and_pads():
    out = tokenize(["a cat", "a photo of a dog"], context_length=10)
    assert out.shape == (2, 10) and out.dtype == torch.long
    assert out[0].tolist() == [SOT, 320, 2368, EOT, 0, 0, 0, 0, 0, 0]
    assert out[1, 6].item() == EOT and out[1, 7:].eq(0).all()
    assert tokenize([]).shape == (0, 77)


def test_exact_fit_needs_no_truncation(tok):
    text = " ".join(["cat"] * 75)
    assert len(tok.encode(text)) == 75
    row = tokenize(text)[0]
    assert row[-1].item() == EOT


def test_truncate_keeps_prefix_and_ends_with_eot(tok):
    text = " ".join(f"word{i}" for i in range(60))
    ids = tok.encode(text)
    assert len(ids) > 75
    row = tokenize(text, truncate=True)[0].tolist()
    assert row == [SOT, *ids[:75], EOT]


def test_too_long_error_message(tok):
    text = "a very long description " + " ".join(["cat"] * 80)
    num_tokens = len(tok.encode(text)) + 2
    with pytest.raises(ContextLengthError) as info:
        tokenize(["short", text])
    assert isinstance(info.value, ValueError) and isinstance(info.value, PromptClipError)
    message = str(info.value)
    assert "a very long description" in message
    assert str(num_tokens) in message and "77" in message and "truncate=True" in message
    assert len(message) < 400  # the text is shortened


def test_default_tokenizer_is_cached():
    assert get_tokenizer() is get_tokenizer()


def test_explicit_vocab_path_gives_same_ids(tmp_path, tok):
    copy = tmp_path / "vocab.txt.gz"
    copy.write_bytes(default_vocab_path().read_bytes())
    assert SimpleTokenizer(copy).encode("a photo of a cat.") == tok.encode("a photo of a cat.")


def test_vocab_checksum_mismatch_names_file(tmp_path):
    text = gzip.decompress(default_vocab_path().read_bytes())
    corrupt = tmp_path / "corrupt_vocab.txt.gz"
    corrupt.write_bytes(gzip.compress(text.replace(b"i n", b"n i", 1)))
    with pytest.raises(VocabularyError, match="corrupt_vocab.txt.gz") as info:
        SimpleTokenizer(corrupt)
    assert isinstance(info.value, PromptClipError)
    assert "sha256" in str(info.value)


def test_missing_vocab_file(tmp_path):
    with pytest.raises(VocabularyError, match="missing.gz"):
        SimpleTokenizer(tmp_path / "missing.gz")
