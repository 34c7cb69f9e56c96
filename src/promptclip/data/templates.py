"""Prompt templates: CoOp's per-dataset zero-shot templates and the CLIP ImageNet template lists.

Sources (data, not code): the 80 templates and the 7-template selection are the lists of the CLIP notebook
``Prompt_Engineering_for_ImageNet.ipynb`` (openai/CLIP), as CoOp ships them in ``trainers/imagenet_templates.py``;
the 60-template list is the one PromptSRC (muzairkhattak/PromptSRC@bb95c77, ``trainers/imagenet_templates.py``) averages
for its frozen text teacher: "a photo of a {}." first, then the first 59 other CLIP templates in CLIP order.
Per-dataset templates follow ``CUSTOM_TEMPLATES`` of CoOp's ``trainers/zsclip.py`` (SPEC section 3.1).
"""

from __future__ import annotations

import string

from ..errors import ConfigError

__all__ = [
    "CUSTOM_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "IMAGENET_TEMPLATES_SELECT",
    "PROMPTSRC_TEMPLATES",
    "DEFAULT_TEMPLATE",
    "ensemble_templates",
    "check_template",
]

DEFAULT_TEMPLATE = "a photo of a {}."

# Keyed by the dataset class name CoOp uses (cfg.DATASET.NAME).
CUSTOM_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}

# The full CLIP list (80 templates), in CLIP's order.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)

# The 7 templates CoOp's ZeroshotCLIP2 ensembles.
IMAGENET_TEMPLATES_SELECT: tuple[str, ...] = (
    'itap of a {}.',
    'a bad photo of the {}.',
    'a origami {}.',
    'a photo of the large {}.',
    'a {} in a video game.',
    'art of the {}.',
    'a photo of the small {}.',
)

# PromptSRC's 60 templates (its ``IMAGENET_TEMPLATES``), in its order.
PROMPTSRC_TEMPLATES: tuple[str, ...] = (
    'a photo of a {}.',
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
)


def ensemble_templates(template: str, coop_name: str | None = None) -> tuple[str, ...]:
    """Templates of CoOp's prompt-ensembling zero-shot baseline (``ZeroshotCLIP2``) for one dataset.

    The 7 selected CLIP templates, plus the dataset's own template unless the dataset is ImageNet itself (CoOp adds the
    custom template for every dataset whose name is not exactly "ImageNet", the ImageNet variants included).
    """
    if coop_name == "ImageNet":
        return IMAGENET_TEMPLATES_SELECT
    return IMAGENET_TEMPLATES_SELECT + (template,)


def check_template(template: str, where: str = "template") -> str:
    """``template`` if it has exactly one ``{}`` where the class name goes (literal braces written ``{{ }}``)."""
    if not isinstance(template, str):
        raise ConfigError(f"{where} {template!r} is not a string")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ConfigError(f"{where} {template!r} is not a valid template ({err}); write literal braces as {{{{ }}}}")\
            from None
    if fields != [""]:
        found = "no '{}'" if not fields else f"the fields {', '.join('{' + f + '}' for f in fields)}"
        raise ConfigError(f"{where} {template!r} has {found}: a template needs exactly one '{{}}' where the class name "
                          "goes, e.g. 'a photo of a {}.'")
    return template
