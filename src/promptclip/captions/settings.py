"""Captioning defaults (kept free of heavy imports: the CLI parser reads them)."""

#: The fixed instruction: it asks for visual content and never names or hints at a label set. [INFERRED: the paper's
#: instruction was not available.]
DEFAULT_INSTRUCTION = (
    "Describe this image in one or two sentences: the main objects, their attributes (colour, shape, texture), "
    "the scene and the context. Be concrete and factual."
)
PROMPT_STYLES = ("auto", "chat", "prefix", "none")
DTYPES = ("auto", "fp32", "bf16", "fp16")
