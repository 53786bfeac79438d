"""The one error type for user mistakes.

Anything a user can fix (a recipe key, a file, an objective, a folder that would be
overwritten) raises :class:`UserError` with one line naming the key, file or objective and
what was expected. ``rmod-distill`` prints that line and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in the user's input; its message is the whole story."""
