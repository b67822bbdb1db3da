"""Errors plait reports to its users.

Each names where the problem is (a module path such as
"model.layers.3.mlp.down_proj", or file:line:column for IR text) and what to do.
"""


class PlaitError(Exception):
    """Base of every error plait raises on bad input."""


class IRParseError(PlaitError):
    """IR text that does not parse."""

    def __init__(self, message: str, filename: str, line: int, column: int, context: str = ""):
        self.filename, self.line, self.column = filename, line, column
        self.message = message
        text = f"{filename}:{line}:{column}: error: {message}"
        super().__init__(text + ("\n" + context if context else ""))


class IRVerifyError(PlaitError):
    """IR that parses but breaks an invariant of the plait dialect."""

    def __init__(self, message: str, where: str = ""):
        self.message, self.where = message, where
        super().__init__(f"{where}: error: {message}" if where else message)
