"""Prompt-learning methods: one file per method, registered by name; methods from outside the package register the
same way (entry points, plugin files and modules: :mod:`promptclip.methods.plugins`)."""

from .base import EvalContext, PromptMethod, register
from .plugins import MethodSource, load_plugin
from .registry import create_method, get_method_class, list_methods, method_source

__all__ = ["EvalContext", "PromptMethod", "MethodSource", "create_method", "get_method_class", "list_methods",
           "load_plugin", "method_source", "register"]
