"""The one exception type the CLI turns into `error: ...` and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad value, corrupt file).

    The message must be one line that names the problem; the CLI prints it
    without a traceback. Anything else escaping a command is a bug.
    """


class Interrupted(Exception):
    """The user stopped a command (Ctrl-C, SIGTERM); what was complete is kept.

    `where`: one line on where it stopped and what is kept; `then`: the command that continues (None:
    the same command again). The CLI prints `interrupted: <where>; continue with: <then>`.
    """

    def __init__(self, where: str, then: str | None = None):
        super().__init__(where)
        self.where, self.then = where, then
