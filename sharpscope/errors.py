"""Exceptions that mean "the user gave something wrong" (the CLI prints them as one line, exit 2)."""

from __future__ import annotations


class UserInputError(ValueError):
    """A user mistake: bad argument, missing dataset, unreadable checkpoint.

    The message says what is wrong and what to do. The CLI prints it as a single line and exits
    with status 2 instead of showing a traceback.
    """
