"""Errors the CLI shows as `Error: ...` (exit 1, or 2 for bad settings) instead of a traceback, and
bulkscore.run raises as they are: JobError and its kinds."""


class JobError(Exception):
    """The job cannot start or cannot finish; the message says what to do."""


class InputError(JobError):
    """An input file or column is unusable; the message names the file, line or column."""


class UsageError(JobError):
    """A setting that cannot work, refused before any work starts (the CLI exits 2). `option` is
    its command-line name; bulkscore.run takes the same name with underscores."""

    def __init__(self, option: str, problem: str) -> None:
        self.option, self.problem = option, problem
        super().__init__(f"Invalid value for '{option}': {problem}")
