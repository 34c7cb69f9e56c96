"""promptclip: prompt learning on frozen CLIP-style vision-language models."""

__version__ = "0.1.0"
