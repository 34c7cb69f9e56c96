"""OpenAI's downloadable CLIP weights: one entry per checkpoint, with its URL and the file's sha256."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

from ..model import OPENAI_MEAN, OPENAI_STD


@dataclass(frozen=True)
class PretrainedWeights:
    """One downloadable checkpoint: ``architecture`` is a key of ``ARCHITECTURES``; ``sha256`` is the file's hash."""

    name: str
    architecture: str
    url: str
    sha256: str
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    quick_gelu: bool = True

    @property
    def filename(self) -> str:
        return os.path.basename(urllib.parse.urlparse(self.url).path)


_OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"


def _openai(name: str, sha256: str, filename: str) -> PretrainedWeights:
    return PretrainedWeights(name=name, architecture=name, url=f"{_OPENAI_BASE}/{sha256}/{filename}", sha256=sha256)


# Source: the ``_MODELS`` table of openai/CLIP, clip/clip.py. OpenAI puts each file's sha256 in its URL.
PRETRAINED: dict[str, PretrainedWeights] = {
    w.name: w
    for w in (
        _openai("RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
        _openai("RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
        _openai("RN50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
        _openai("RN50x16", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
        _openai("RN50x64", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
        _openai("ViT-B/32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
        _openai("ViT-B/16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
        _openai("ViT-L/14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
        _openai("ViT-L/14@336px", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                "ViT-L-14-336px.pt"),
    )
}


def available_models() -> list[str]:
    """Names of the downloadable pretrained models."""
    return list(PRETRAINED)
