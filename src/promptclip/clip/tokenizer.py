"""CLIP's byte-level BPE tokenizer, with the semantics of OpenAI's ``SimpleTokenizer`` and ``clip.tokenize``.

Text is cleaned (ftfy, HTML unescaping, whitespace collapsing), lowercased and split into words by CLIP's regular
expression. Each word is mapped byte by byte onto printable unicode characters, the last one marked with ``</w>``,
and merged by BPE in the order of the merge list. The vocabulary is: 256 byte symbols, the same with ``</w>``, one
entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import itertools
import math
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import ftfy
import regex
import torch

from ..errors import PromptClipError

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"

_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE_RUN = regex.compile(r"\s+")


class VocabularyError(PromptClipError):
    """The BPE vocabulary file is missing or is not the expected one."""


class ContextLengthError(PromptClipError, ValueError):
    """A text encodes to more tokens than the model's context length (``text``, ``num_tokens`` with the start and
    end tokens, ``context_length``)."""

    def __init__(self, message: str, text: str = "", num_tokens: int | None = None, context_length: int = 77):
        super().__init__(message)
        self.text = text
        self.num_tokens = num_tokens
        self.context_length = context_length


def byte_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character, so that BPE works on strings without whitespace or control codes.

    Printable Latin-1 bytes map to themselves; the others get the code points from 256 upwards, in byte order. The
    dict's order (printable bytes first) is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


def clean_text(text: str) -> str:
    """ftfy repair, double HTML unescape, whitespace collapsed to single spaces, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def default_vocab_path():
    """The packaged vocabulary (an importlib.resources Traversable)."""
    return resources.files("promptclip") / "clip" / "assets" / VOCAB_FILENAME


def read_merges(vocab_path, expected_sha256: str | None = VOCAB_SHA256) -> list[tuple[str, str]]:
    """The BPE merges of a vocabulary file (a path or a Traversable), in priority order, after checking its sha256."""
    if not hasattr(vocab_path, "read_bytes"):
        vocab_path = Path(vocab_path)
    name = str(vocab_path)
    try:
        data = vocab_path.read_bytes()
    except OSError as exc:
        raise VocabularyError(f"Cannot read the CLIP BPE vocabulary {name}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise VocabularyError(
            f"The CLIP BPE vocabulary {name} has sha256 {digest}, expected {expected_sha256}: the file is corrupt or "
            "not the OpenAI vocabulary. Reinstall promptclip or pass the correct file."
        )
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 0 is a version header; only the first NUM_MERGES merges are part of CLIP's vocabulary.
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]


class SimpleTokenizer:
    """CLIP's BPE tokenizer. ``encode`` returns ids without start/end tokens; see :func:`tokenize` for model input."""

    def __init__(self, vocab_path: str | os.PathLike | None = None, expected_sha256: str | None = VOCAB_SHA256):
        merges = read_merges(default_vocab_path() if vocab_path is None else vocab_path, expected_sha256)
        self._byte_encoder = byte_to_unicode()
        self._byte_decoder = {char: byte for byte, char in self._byte_encoder.items()}
        symbols = list(self._byte_encoder.values())
        merged = ["".join(m) for m in merges]
        vocab = symbols + [s + END_OF_WORD for s in symbols] + merged + [START_OF_TEXT, END_OF_TEXT]
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._decoder = {i: token for token, i in self._encoder.items()}
        self._merge_rank = {merge: rank for rank, merge in enumerate(merges)}
        self._bpe_cache: dict[str, tuple[str, ...]] = {START_OF_TEXT: (START_OF_TEXT,), END_OF_TEXT: (END_OF_TEXT,)}

    @property
    def sot_id(self) -> int:
        return self._encoder[START_OF_TEXT]

    @property
    def eot_id(self) -> int:
        return self._encoder[END_OF_TEXT]

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            mapped = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self._encoder[piece] for piece in self._bpe(mapped))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; every end-of-word marker becomes a space (so words and punctuation come out spaced)."""
        chars = "".join(self._decoder[int(i)] for i in ids)
        raw = bytearray(self._byte_decoder[c] for c in chars)
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def _bpe(self, word: str) -> tuple[str, ...]:
        cached = self._bpe_cache.get(word)
        if cached is None:
            cached = self._bpe_cache[word] = self._merge_word(word)
        return cached

    def _merge_word(self, word: str) -> tuple[str, ...]:
        parts = (*word[:-1], word[-1] + END_OF_WORD)
        while len(parts) > 1:
            best = min(itertools.pairwise(parts), key=lambda pair: self._merge_rank.get(pair, math.inf))
            if best not in self._merge_rank:
                break
            parts = _merge_pair(parts, best)
        return parts


def _merge_pair(parts: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every occurrence of ``pair``, scanning left to right without overlaps."""
    merged = []
    i = 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            merged.append(parts[i] + parts[i + 1])
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return tuple(merged)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    """The tokenizer of the packaged vocabulary, built once per process."""
    return SimpleTokenizer()


def tokenize(
    texts: str | list[str],
    context_length: int = 77,
    truncate: bool = False,
    *,
    tokenizer: SimpleTokenizer | None = None,
) -> torch.Tensor:
    """``[SOT] + ids + [EOT]`` per text, zero padded to ``context_length``: a LongTensor ``[N, context_length]``.

    A text longer than the context raises :class:`ContextLengthError`, unless ``truncate`` is set: then the first
    ``context_length`` tokens are kept and the last one is replaced by EOT.
    """
    tokenizer = get_tokenizer() if tokenizer is None else tokenizer
    texts = [texts] if isinstance(texts, str) else list(texts)
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tokenizer.sot_id, *tokenizer.encode(text), tokenizer.eot_id]
        if len(ids) > context_length:
            if not truncate:
                raise ContextLengthError(_too_long_message(text, len(ids), context_length), text, len(ids),
                                         context_length)
            ids = ids[:context_length]
            ids[-1] = tokenizer.eot_id
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result


def _too_long_message(text: str, num_tokens: int, context_length: int) -> str:
    shown = text if len(text) <= 60 else text[:57] + "..."
    return (
        f"The text {shown!r} encodes to {num_tokens} tokens (with start and end tokens), more than the context length "
        f"{context_length}. Shorten it, or pass truncate=True to keep the first {context_length} tokens."
    )
