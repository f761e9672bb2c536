"""Errors caused by what a user asked for, as opposed to bugs in m3.

The command line prints a `UserError` as one clear message, without a traceback, and exits
with status 2. Library code raises it for bad input: wrong recipe keys, missing files,
mismatched shapes or models.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported without a traceback.

    Its message says what is wrong, naming the offending key, file or argument and what was
    expected instead.
    """
