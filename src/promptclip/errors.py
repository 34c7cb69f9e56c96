"""Errors that carry a message meant for the user: the CLI prints them as one paragraph, without a traceback."""


class PromptClipError(Exception):
    """Base class of every error whose message tells the user what went wrong and what to do."""


class ConfigError(PromptClipError, ValueError):
    """A bad configuration key or value."""


class WeightsError(PromptClipError):
    """Backbone weights could not be downloaded, verified or loaded."""


class DataError(PromptClipError):
    """A dataset, split file or image is missing or invalid."""


class BackboneWarning(UserWarning):
    """Something about loaded backbone weights that may make its features wrong (an assumed head width, an
    activation other than the one the weights declare); the CLI shows it as a banner."""
