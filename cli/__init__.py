"""The `privdiff` command (`python -m privdiff` too).

Every error a user can cause ends as one line, `privdiff <command>: error: <what is wrong and what to
do>`, and exit code 2; `-v` shows the traceback as well. What can be checked is checked before any
model loads and before anything is written, so a refused run costs seconds and leaves no file.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# Privacy users expect silence: no library telemetry unless they turn it back on themselves.
for _var, _value in {"HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "FLWR_TELEMETRY_ENABLED": "0",
                     "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_var, _value)

from .parser import build_parser  # noqa: E402

# Optional packages a command may need, and how to get them.
OPTIONAL = {"flwr": "pip install 'privdiff[federated]'", "ray": "pip install 'privdiff[federated]'",
            "sklearn": "pip install 'privdiff[analysis]'"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = f"privdiff {args.command_name}"
    from ..console import configure

    configure(verbose=args.verbose, quiet=args.quiet)
    for notice in args.former_flags:
        logging.getLogger("privdiff").warning("%s: %s", name, notice)
    module, function = args.handler.split(":")
    try:
        _check_base_options(args)
        return getattr(importlib.import_module(f".{module}", __name__), function)(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 (bugs are re-raised below)
        message = user_message(error)
        if message is None:
            raise  # not something the user did: a bug, with its traceback
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2


def _check_base_options(args) -> None:
    """--config and the tokenizers describe a single-file --base; with anything else they would be
    silently unused, so they are refused."""
    given = [f"--{name.replace('_', '-')}" for name in ("config", "tokenizer", "tokenizer_2") if getattr(args, name, None)]
    base = str(getattr(args, "base", None) or "")
    if given and not base.endswith((".safetensors", ".ckpt")):
        raise ValueError(f"{' and '.join(given)} go with a single-file --base (.safetensors or .ckpt); "
                         f"--base {base or 'tiny'} loads without them: leave them out.")


def user_message(error: BaseException) -> str | None:
    """The one line for an error the user caused and can fix; None for anything else (a bug)."""
    from ..errors import UserError

    if isinstance(error, ModuleNotFoundError):
        package = (error.name or "").split(".")[0]
        if package not in OPTIONAL:
            return None
        return f"this command needs the optional package {package!r}: {OPTIONAL[package]}"
    if isinstance(error, OSError) and error.strerror:  # errno-carrying: the OS's words, and the file
        text = error.strerror + (f" ({error.filename})" if error.filename else "")
    elif isinstance(error, (ValueError, OSError, UserError)):
        text = str(error) or type(error).__name__
    else:
        return None
    return " ".join(text.split())  # one line, whatever the message held
