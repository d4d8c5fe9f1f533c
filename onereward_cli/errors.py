"""Errors that the CLI turns into a one-line message and exit code 2."""


class InputError(Exception):
    """Bad user input: a recipe key, a file, a line, a field. Exit code 2, nothing half-written."""

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
