"""Typed errors. Each carries a one-line message meant for the user as it is.

The CLI prints `error: <message>` and exits 2 for any SpecVLMError; the app shows the
message in the page. Anything else is a bug.
"""


class SpecVLMError(Exception):
    """Base class of every error the user can cause and fix."""


class InputError(SpecVLMError, ValueError):
    """Bad user input: media, prompt or parameters."""


class MediaError(InputError):
    """An image or video that cannot be read or is out of bounds."""


class ParameterError(InputError):
    """A generation, tree or training parameter out of range."""


class ModelLoadError(SpecVLMError):
    """A target or draft model that cannot be loaded (missing, offline, wrong kind)."""


class DraftMismatchError(ModelLoadError):
    """A draft trained for another target."""
