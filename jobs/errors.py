"""Errors the CLI shows as `Error: ...` (exit 1) instead of a traceback."""


class JobError(Exception):
    """The job cannot start or cannot finish; the message says what to do."""


class InputError(JobError):
    """An input file or column is unusable; the message names the file, line or column."""
