"""Errors that the user can act on. The CLI prints their message without a traceback."""

import functools


class DreamboothError(Exception):
    """Base class: the message names the file/option and what is wrong."""


class ConfigError(DreamboothError, ValueError):
    """A config file or option holds a key or value we do not support."""


class CheckpointError(DreamboothError, ValueError):
    """A checkpoint folder is missing, incomplete or does not match the model."""


def user_errors(fn):
    """CLI decorator: our errors (bad files, options, configs) become a one-line message, exit 1."""
    import click

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DreamboothError as e:
            raise click.ClickException(str(e)) from None

    return wrapper
