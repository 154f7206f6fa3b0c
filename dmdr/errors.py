"""User-facing errors: the CLI turns these into one line on stderr and exit code 2 (no traceback)."""


class UserError(ValueError):
    """Bad input from the user (a file, an argument, a recipe field). ``str(e)`` says what is wrong and the fix."""
