"""The one error type for problems a user can fix; the CLI prints its message and exits with status 2."""


class LmforgeError(Exception):
    """Bad input, config or files: the message names the problem and the fix."""
