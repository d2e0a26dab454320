"""The one kind of error a caller can fix by changing an input."""

from __future__ import annotations


class InputError(ValueError):
    """An input (a folder, a file, a setting) that cannot be used as given.

    The message names the problem and the fix. Settings are named as the arguments of the
    core functions, in backticks (`cut_at`, `weights_file`), so that a front end with its own
    names for them (the Kedro project's parameter keys) can put those in their place.
    """
