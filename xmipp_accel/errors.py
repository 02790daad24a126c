"""Error types whose messages are shown to users as they are (no traceback).

Raise :class:`InputError` for bad files or parameters (the message names the
file or the option and the fix); the command line turns any
:class:`XmippAccelError` into one ``error: ...`` line and exit status 2.
"""


class XmippAccelError(Exception):
    """Base class of errors meant for the user."""


class InputError(XmippAccelError, ValueError):
    """Bad input file or parameter; the message says which and how to fix it."""


class FileFormatError(InputError):
    """A file is missing, truncated or not of the expected format."""


class TruncatedFileError(FileFormatError):
    """A file holds fewer bytes than its header announces (empty, interrupted copy, or still being written)."""


from .backend import BackendError  # noqa: E402  (re-exported: a missing GPU is a user error)

USER_ERRORS = (XmippAccelError, BackendError)
