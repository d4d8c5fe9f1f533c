"""Errors that the CLI turns into a one-line message: exit code 2 for bad input, 3 for an aborted run."""


class _Located(Exception):
    """A message prefixed with where it applies: `<file>[:line]: <field>: <problem>`."""

    def __init__(self, message: str, *, path=None, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field = path, line, field
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        if field:
            where += f"{field}: "
        super().__init__(where + message)


class InputError(_Located):
    """Bad user input: a recipe key, a file, a line, a field. Exit code 2, nothing half-written."""


class TrainingAborted(_Located):
    """Training stopped on purpose (too many non-finite losses). Exit code 3; the last good checkpoint stays."""
