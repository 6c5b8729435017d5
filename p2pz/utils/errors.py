"""One exception type for problems the user can fix, printed by the CLI as a single line."""


class UserError(Exception):
    """Bad input or a missing resource: the message says what is wrong and what to do.

    The CLI prints it as one ``error: ...`` line and exits with status 2, without a traceback.
    """
