"""The one exception type that reaches the user as a single clear line (no traceback)."""


class UserError(Exception):
    """A problem with the user's input: names the file, key or value, and the fix."""
