"""The one error class privdiff's command turns into a single `privdiff <command>: error: …` line.

ValueError and OSError (bad settings, bad files, a full disk) read that way too; `UserError` marks the
others a user causes and can fix (a server that does not answer, a budget that is spent). Anything
else is a bug and keeps its traceback. This module imports nothing, so every layer may use it.
"""


class UserError(Exception):
    """Something the user caused and can fix; its message says what to do."""


def public_name(cls: type) -> type:
    """Name an error class as users know it, `privdiff.<module>`, whatever name the package was
    imported under: ComfyUI imports a node pack under its folder's path, and shows an error's type as
    module + class, which would read `/home/me/ComfyUI/custom_nodes/privdiff.data.base.DatasetError`."""
    root = __name__.rsplit(".", 1)[0]
    if cls.__module__.startswith(root + "."):
        cls.__module__ = "privdiff" + cls.__module__[len(root):]
    return cls
