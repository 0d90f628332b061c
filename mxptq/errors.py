"""The one exception type a user can cause; the CLI prints it as one line and exits non-zero."""


class MxptqError(Exception):
    """A problem with the user's input or environment, described in one line."""


class ResumableError(MxptqError):
    """The run stopped for a cause outside its input (a full disk, an unreadable file, a
    signal): the finished shards are kept and `--resume` continues once the cause is fixed."""

