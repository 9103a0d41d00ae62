"""The glimp error hierarchy: turned into one-line messages at the CLI edge only."""


class GlimpError(Exception):
    """A failure the user can act on; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(GlimpError):
    """A models.yaml file or setting is wrong (the message names the file and key)."""


class ModelError(GlimpError):
    """A model cannot be located, assembled or loaded."""


class MissingExtraError(ModelError):
    """An optional dependency is not installed (the message says what to install)."""


class UsageError(GlimpError):
    """The command line asks for something impossible."""

    exit_code = 2


class ContextLimitError(GlimpError):
    """The prompt does not fit the model's context window."""


class InputError(GlimpError):
    """An input file (questions, traces) is malformed; the message names file and line."""


class BackendError(GlimpError):
    """A serving engine failed (down, wrong URL, timeout, HTTP error)."""


class ConversationError(GlimpError):
    """A conversation cannot be written in a model's prompt format (the message says why)."""
