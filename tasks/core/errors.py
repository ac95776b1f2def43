"""The one family of exceptions that means "the input or the config is wrong".

The entry point prints these as one line and exits 2; any other exception is a bug and shows its
traceback (exit 1). Raise them only where the message tells the user what to fix.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (a model, a task, a config value); the message names what to fix."""
