"""The one exception type for mistakes a user can fix.

Library code raises UserError with a message that says what was wrong and what to do; the CLI
prints it on one line and exits with code 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A user mistake (bad path, bad flag, bad data); the CLI shows the message and exits 2."""


class StudyRefused(UserError):
    """A comparison whose study cannot mean anything at its settings (e.g. data fractions that select the
    same documents): `adaptlab reproduce` records it as not run and goes on with the other comparisons."""
