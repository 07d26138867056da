"""The one error class privdiff's command turns into a single `privdiff <command>: error: …` line.

ValueError and OSError (bad settings, bad files, a full disk) read that way too; `UserError` marks the
others a user causes and can fix (a server that does not answer, a budget that is spent). Anything
else is a bug and keeps its traceback. This module imports nothing, so every layer may use it.
"""


class UserError(Exception):
    """Something the user caused and can fix; its message says what to do."""
