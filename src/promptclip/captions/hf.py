"""Captioning with a multimodal LLM through Hugging Face ``transformers`` (the optional extra ``promptclip[hf]``).

Any model that ``AutoModelForImageTextToText`` (or, on older transformers, ``AutoModelForVision2Seq``) loads, by hub
name or local path: Qwen2-VL / Qwen2.5-VL, LLaVA(-1.5/-NeXT), Idefics, PaliGemma, BLIP, ...

Prompt styles:

- ``chat``: the instruction is sent as a user turn ``[image, instruction]`` through the processor's chat template
  (instruction-tuned MLLMs);
- ``prefix``: the instruction is given as the text the caption continues (BLIP-style conditional captioning, e.g.
  "a picture of"); the decoded text then starts with it;
- ``none``: images only (unconditional captioning);
- ``auto`` (default): ``chat`` when the processor has a chat template, else ``none``.

Decoding is greedy or beam search (never sampling), so a caption is a function of the image and the settings.
For decoder-only models the prompt tokens are cut from the output before decoding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .settings import DEFAULT_INSTRUCTION, DTYPES, PROMPT_STYLES
from .store import sha256_text

__all__ = ["DEFAULT_INSTRUCTION", "HFCaptioner", "require_transformers", "resolve_dtype", "PROMPT_STYLES"]



def require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "captioning with a multimodal LLM needs the optional dependency transformers: "
            "pip install 'promptclip[hf]' (or pass your own captions file: JSONL or CSV path,caption)"
        ) from None
    return transformers


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _dtype_keyword(transformers: Any) -> str:
    """``dtype`` from transformers 4.56 on, ``torch_dtype`` before (unknown keywords are silently ignored there)."""
    match = re.match(r"(\d+)\.(\d+)", getattr(transformers, "__version__", "0.0"))
    major, minor = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _load_model(transformers: Any, model: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    classes = [getattr(transformers, n) for n in ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
               if hasattr(transformers, n)]
    kwargs[_dtype_keyword(transformers)] = dtype
    errors = []
    for cls in classes:
        try:
            return cls.from_pretrained(model, **kwargs)
        except ValueError as err:  # this auto class does not know the architecture
            errors.append(f"{cls.__name__}: {err}")
    raise ConfigError(f"cannot load {model!r} as an image-text-to-text model: " + "; ".join(errors)[:600])


class HFCaptioner:
    """One caption per image from a transformers MLLM; ``provenance`` identifies the configuration."""

    def __init__(self, model: str, instruction: str = DEFAULT_INSTRUCTION, prompt_style: str = "auto",
                 device: str = "cpu", dtype: str = "auto", max_new_tokens: int = 48, num_beams: int = 1,
                 revision: str | None = None, local_files_only: bool = False, trust_remote_code: bool = False):
        transformers = require_transformers()
        if prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"unknown prompt style {prompt_style!r}; choose one of {', '.join(PROMPT_STYLES)}")
        if max_new_tokens < 1 or num_beams < 1:
            raise ConfigError("max_new_tokens and num_beams must be at least 1")
        local = Path(model).expanduser()
        if model.startswith(("/", "./", "../", "~")) and not local.is_dir():
            raise ConfigError(f"captioning model folder {local} does not exist (a local model is a folder saved with "
                              "save_pretrained; a hub model is named like Qwen/Qwen2-VL-2B-Instruct)")
        self.model_id = model
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.torch_dtype = resolve_dtype(dtype, device)
        kwargs: dict[str, Any] = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
        if revision:
            kwargs["revision"] = revision
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(model, **kwargs)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"cannot load the processor of captioning model {model!r}: {err}. Pass a hub name (downloaded on "
                "first use) or a local folder saved with save_pretrained"
            ) from None
        try:
            self.model = _load_model(transformers, model, self.torch_dtype, **kwargs)
        except OSError as err:
            raise ConfigError(f"cannot load captioning model {model!r}: {err}") from None
        self.model.to(self.device).eval()
        self.is_encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and not self.is_encoder_decoder:
            tokenizer.padding_side = "left"  # decoder-only generation continues the last (real) token
        if prompt_style == "auto":
            prompt_style = "chat" if getattr(self.processor, "chat_template", None) else "none"
        if prompt_style == "chat" and not getattr(self.processor, "chat_template", None):
            raise ConfigError(f"model {model!r} has no chat template; use --prompt-style prefix or none")
        self.prompt_style = prompt_style
        self.instruction = instruction if prompt_style != "none" else ""
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.prompt = self._prompt_text()

    def _prompt_text(self) -> str | None:
        if self.prompt_style == "chat":
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.instruction}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self.prompt_style == "prefix":
            return self.instruction
        return None

    @property
    def generation(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": False,
                "dtype": str(self.torch_dtype).replace("torch.", "")}

    @property
    def provenance(self) -> dict[str, Any]:
        """What identifies a caption's configuration (stored on every cache line)."""
        return {
            "source": "generated",
            "model": self.model_id,
            # The hash covers what the model actually reads: the instruction inside its chat template.
            "instruction_sha256": sha256_text(f"{self.prompt_style}\n{self.prompt or ''}"),
            "prompt_style": self.prompt_style,
            "generation": self.generation,
            "instruction": self.instruction,
        }

    @torch.no_grad()
    def caption(self, images: Sequence[Any]) -> list[str]:
        """Captions of PIL images, in order."""
        if not images:
            return []
        kwargs: dict[str, Any] = {"images": list(images), "return_tensors": "pt"}
        if self.prompt is not None:
            kwargs["text"] = [self.prompt] * len(images)
            kwargs["padding"] = True
        inputs = self.processor(**kwargs)
        inputs = {k: (v.to(self.device, self.torch_dtype) if torch.is_floating_point(v) else v.to(self.device))
                  if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                  do_sample=False)
        prompt_ids = inputs.get("input_ids")
        if (prompt_ids is not None and not self.is_encoder_decoder and out.shape[1] >= prompt_ids.shape[1]
                and torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids)):
            out = out[:, prompt_ids.shape[1]:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]
