"""The one exception type a user can cause; the CLI prints it as one line and exits non-zero."""


class MxptqError(Exception):
    """A problem with the user's input or environment, described in one line."""
