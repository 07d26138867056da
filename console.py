"""privdiff's console: its own messages go through `logging.getLogger("privdiff")`, and the libraries it
drives stay quiet about what privdiff's own calls cause (loading bars inside its loads, warnings about
packages it never needs, Flower's per-round INFO lines unless asked for).

Outside the layers (like `errors`): any module may use it; it imports only what it quiets, when asked.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

LOGGER = logging.getLogger("privdiff")


def get_logger(name: str | None = None) -> logging.Logger:
    """privdiff's logger, or one of its children ("privdiff.<name>")."""
    return LOGGER.getChild(name) if name else LOGGER


@contextmanager
def quiet_loading():
    """diffusers' and transformers' loading bars and info lines off while privdiff loads a model (the
    caller's settings restored after): a load inside a run is not news to whoever started the run."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(module, module.is_progress_bar_enabled(), module.get_verbosity())
             for module in (diffusers_logging, transformers_logging)]
    for module, _, _ in saved:
        module.disable_progress_bar()
        module.set_verbosity_error()
    try:
        yield
    finally:
        for module, bar, level in saved:
            (module.enable_progress_bar if bar else module.disable_progress_bar)()
            module.set_verbosity(level)


def configure(*, verbose: bool = False, quiet: bool = False) -> None:
    """The command line's console (it owns the process): privdiff's messages on stderr (INFO; WARNING
    with `quiet`; DEBUG with `verbose`), libraries' own chatter only with `verbose`, no colour codes
    when stderr is not a terminal."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    LOGGER.setLevel(level)
    if not any(isinstance(handler, _CurrentStderr) for handler in LOGGER.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    if not verbose:
        # transformers warns on import that torchvision is missing; privdiff never needs it.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if not sys.stderr.isatty():  # a log file: no carriage-return bars, no colour codes
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("NO_COLOR", "1")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a message is emitted (test runners and GUIs swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys.stderr
