"""The one kind of error a caller can fix by changing an input."""

from __future__ import annotations


class InputError(ValueError):
    """An input (a folder, a file, a setting) that cannot be used as given.

    The message names the problem and the fix. Settings are named as the arguments of the
    core functions, in backticks (`cut_at`, `weights_file`), so that a front end with its own
    names for them (the Kedro project's parameter keys) can put those in their place.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), at most 300
    characters: how an upstream library's error is quoted inside one of ours."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
