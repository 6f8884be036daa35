"""The one exception type the CLI turns into `error: ...` and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad value, corrupt file).

    The message must be one line that names the problem; the CLI prints it
    without a traceback. Anything else escaping a command is a bug.
    """


class Interrupted(Exception):
    """The user stopped a command (Ctrl-C, SIGTERM) and its state was saved; the message says how to go on."""
