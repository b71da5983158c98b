"""Errors that the user can act on. The CLI prints their message without a traceback."""


class DreamboothError(Exception):
    """Base class: the message names the file/option and what is wrong."""


class ConfigError(DreamboothError, ValueError):
    """A config file or option holds a key or value we do not support."""


class CheckpointError(DreamboothError, ValueError):
    """A checkpoint folder is missing, incomplete or does not match the model."""
