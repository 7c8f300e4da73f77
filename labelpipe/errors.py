"""The one exception type users see: a one-line message that names the file and the fix."""


class LabelpipeError(Exception):
    """Bad input or usage. The CLI prints ``str(error)`` on one line and exits with status 2."""
