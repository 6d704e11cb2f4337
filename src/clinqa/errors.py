"""One exception type for problems the user can fix: the CLI prints its message on one line, no traceback."""


class ClinqaError(Exception):
    """A user-facing error: bad input, a missing model, an unreachable endpoint.

    The message must say what went wrong (naming the file, line or field) and what to try.
    """
