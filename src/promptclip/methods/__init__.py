"""Prompt-learning methods: one file per method, registered by name."""

from .base import PromptMethod, create_method, get_method_class, list_methods, register

__all__ = ["PromptMethod", "create_method", "get_method_class", "list_methods", "register"]
