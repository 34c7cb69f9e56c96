"""The method contract (promptclip.testing), run over every built-in method, one test per method and check: the same
suite a plugin author runs with ``check_method(MyPrompt)`` (a new method is tested without touching this file).

Every method runs with its default (official) configuration on the contract backbone (12 layers per tower, so
official prompt depths fit, small unequal widths, so hard-coded dimensions fail).
"""

import pytest

from promptclip.methods import get_method_class, list_methods
from promptclip.methods.registry import load_builtin_methods
from promptclip.testing import CHECKS, check_method, contract_backbone

load_builtin_methods()
METHODS = list_methods()


@pytest.fixture(scope="module")
def backbone():
    return contract_backbone()


def test_registry_has_the_methods_we_exist_for():
    assert {"zeroshot", "coop", "cocoop", "kgcoop", "vpt", "ivlp", "maple", "promptsrc", "dcp", "mugcp"} <= set(METHODS)


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("name", METHODS)
def test_method_keeps_the_contract(name, check, backbone):
    check_method(name, checks=[check], backbone=backbone)


def test_the_builtin_frozen_image_methods():
    frozen = {n for n in METHODS if get_method_class(n).frozen_image_features}
    assert {"zeroshot", "coop", "cocoop", "kgcoop"} <= frozen
    assert not frozen & {"vpt", "ivlp", "maple", "promptsrc", "dcp", "mugcp"}  # prompts enter their image towers
