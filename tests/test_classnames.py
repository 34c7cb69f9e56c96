"""The one class-name check (promptclip.data.classnames) on every path class names take through the API: every
method's constructor and ``set_classnames``, the predictor, adapters, datasets; prompts over the text context; the
templates."""

import json
import shutil
from pathlib import Path

import pytest

from promptclip.api import Predictor, zero_shot
from promptclip.checkpoint import AdapterError, load_adapter, save_adapter
from promptclip.clip.architectures import build_random
from promptclip.clip.tokenizer import ContextLengthError, get_tokenizer
from promptclip.data import imagenet_classnames, load_folder_dataset, load_splits
from promptclip.data.classnames import check_classnames
from promptclip.data.templates import PROMPTSRC_TEMPLATES, check_template
from promptclip.errors import ConfigError, DataError
from promptclip.methods import create_method, get_method_class, list_methods
from promptclip.protocols import Backbone

METHODS = list_methods()
#: Methods whose class names go into text prompts (the linear probe has no text side).
TEXT_METHODS = [name for name in METHODS if get_method_class(name).names_in_text]
CONFIGS = {"mugcp": {"missing_caption": "fallback"}}


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny", seed=0)


def words(n: int) -> str:
    name = " ".join(["word"] * n)
    assert len(get_tokenizer().encode(name)) == n
    return name


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("classes, shown", [
    (["cat", "dog", "cat"], "'cat' = 'cat'"),
    (["sea_lake", "forest", "sea lake"], "'sea_lake' = 'sea lake'"),
    (["Sea Lake", "sea  lake"], "'Sea Lake' = 'sea  lake'"),  # the tokenizer lowercases and collapses spaces
    (["AT&amp;T", "at&t"], "'AT&amp;T' = 'at&t'"),  # and unescapes HTML
])
def test_every_method_refuses_names_the_text_encoder_cannot_tell_apart(name, classes, shown, tiny):
    with pytest.raises(ConfigError, match="cannot tell apart") as info:
        create_method(name, tiny, classes, CONFIGS.get(name))
    assert shown in str(info.value)
    method = create_method(name, tiny, ["cat", "dog"], CONFIGS.get(name))
    with pytest.raises(ConfigError, match="cannot tell apart"):
        method.set_classnames(classes)
    assert method.classnames == ["cat", "dog"]  # the refused set changed nothing


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_every_method_names_the_class_whose_prompt_exceeds_the_context(name, tiny):
    long = words(100)
    with pytest.raises(ContextLengthError) as info:
        create_method(name, tiny, ["dog", long, "cat"], CONFIGS.get(name))
    message = str(info.value)
    assert "is 100 tokens long" in message and "context of 77" in message and "word word" in message
    assert info.value.num_tokens > 77 and info.value.context_length == 77
    method = create_method(name, tiny, ["cat", "dog"], CONFIGS.get(name))
    with pytest.raises(ContextLengthError, match="is 100 tokens long"):
        method.set_classnames(["dog", long])
    assert method.classnames == ["cat", "dog"]  # the method keeps its class set


def test_a_method_without_text_prompts_takes_any_name_length(tiny):
    assert set(METHODS) - set(TEXT_METHODS) == {"linear_probe"}
    method = create_method("linear_probe", tiny, ["dog", words(100), "cat"])
    assert method.num_classes == 3


def test_the_budget_message_counts_the_prompt_around_the_name(tiny):
    # "a photo of a {}." takes SOT, 4 words, the full stop and EOT: 70 tokens are left for the name.
    create_method("zeroshot", tiny, [words(70), "dog"], template="a photo of a {}.")
    with pytest.raises(ContextLengthError, match="at most 70; 1 other class name") as info:
        create_method("zeroshot", tiny, [words(72), words(71), "dog"], template="a photo of a {}.")
    assert "is 72 tokens long" in str(info.value) and "needs 79 tokens" in str(info.value)


def test_teacher_templates_are_checked_when_the_method_is_built(tiny):
    """PromptSRC encodes its 60-template teacher lazily (first training step): a name that fits the prompt but not
    the longest teacher template fails when the method is built, not in the middle of training."""
    tokenizer = get_tokenizer()
    longest = max(len(tokenizer.encode(t.format(""))) for t in PROMPTSRC_TEMPLATES)
    fits_prompt = words(77 - 2 - longest + 1)  # one token too many for the longest teacher template
    create_method("ivlp", tiny, [fits_prompt, "dog"])
    with pytest.raises(ContextLengthError, match=f"is {77 - 2 - longest + 1} tokens long"):
        create_method("promptsrc", tiny, [fits_prompt, "dog"])


def test_empty_names_are_refused(tiny):
    with pytest.raises(ConfigError, match="class 1 has an empty name"):
        create_method("coop", tiny, ["cat", " _ "])
    with pytest.raises(ConfigError, match="no class name"):
        create_method("coop", tiny, [])


def test_coops_imagenet_names_are_accepted_whole_or_in_contiguous_parts():
    """CoOp's ImageNet names call two pairs of classes alike (the papers evaluate them so): that list and its
    base / new halves pass; the same duplicates in any other list do not."""
    names = imagenet_classnames()
    for part in (names, names[:500], names[500:], names[600:800]):
        assert check_classnames(part) == [n.replace("_", " ") for n in part]
    with pytest.raises(ConfigError, match="'missile' = 'missile'"):
        check_classnames(["missile", "missile"])
    with pytest.raises(ConfigError, match="'sunglasses' = 'sunglasses'"):
        check_classnames(["cat", *names[830:840]])


def test_predictor_zero_shot_and_adapter_paths_check_names(tiny, tmp_path):
    backbone = Backbone(tiny, "tiny", "fp")
    with pytest.raises(ConfigError, match="'cat' = 'Cat'"):
        zero_shot(["cat", "Cat"], backbone)
    predictor = zero_shot(["cat", "dog"], backbone)
    with pytest.raises(ConfigError, match="'river' = 'river'"):
        predictor.set_classnames(["river", "river"])
    method = create_method("coop", tiny, ["cat", "dog"])
    save_adapter(tmp_path / "adapter", method, "tiny", "fp")
    with pytest.raises(AdapterError, match="'a' = 'A'"):
        load_adapter(tmp_path / "adapter.safetensors", tiny, classnames=["a", "A"])
    assert isinstance(Predictor(load_adapter(tmp_path / "adapter.safetensors", tiny), backbone), Predictor)


def test_a_folder_dataset_with_duplicate_classes_fails_before_writing_its_split(tmp_path):
    image = Path(load_splits("eurosat-sample").test[0].path)
    for name in ("sea_lake", "Sea Lake", "forest"):
        (tmp_path / name).mkdir()
        for i in range(3):
            shutil.copy(image, tmp_path / name / f"{i}.jpg")
    with pytest.raises(DataError, match=r"'Sea Lake' = 'sea_lake'") as info:
        load_folder_dataset(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert not (tmp_path / "split_promptclip.json").exists()


def test_an_adapter_whose_metadata_is_damaged_is_an_adapter_error(tiny, tmp_path):
    method = create_method("coop", tiny, ["cat", "dog"])
    save_adapter(tmp_path / "adapter", method, "tiny", "fp")
    meta = json.loads((tmp_path / "adapter.json").read_text())
    for damaged, message in ((["list"], "must be a JSON object"), ({**meta, "classnames": "cat"}, "'classnames'")):
        (tmp_path / "adapter.json").write_text(json.dumps(damaged))
        with pytest.raises(AdapterError, match=message):
            load_adapter(tmp_path / "adapter.safetensors", tiny)


@pytest.mark.parametrize("template, message", [
    ("a photo", "has no '{}'"),
    ("a {0} {1}", "the fields {0}, {1}"),
    ("{} {}", "the fields {}, {}"),
    ("a {name}", "the fields {name}"),
    ("a {", "not a valid template"),
])
def test_templates_need_exactly_one_placeholder(template, message, tiny):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        check_template(template)
    with pytest.raises(ConfigError, match="template"):
        create_method("zeroshot", tiny, ["cat", "dog"], template=template)


def test_templates_with_one_placeholder_and_literal_braces_pass():
    assert check_template("a {{sketch}} of a {}.") == "a {{sketch}} of a {}."
