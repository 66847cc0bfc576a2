"""Entry points report the project's own errors as one message and a non-zero exit status.

A user who passes a wrong option, a missing file or a checkpoint of another model gets the
error's message (which names the file or field and the way out), not a traceback. `--debug` on
the command line, or the environment variable DINO_UGS_DEBUG=1, re-raises with the traceback.

    @entry_point
    def main(argv=None) -> int: ...      # main([...]) returns 2 on such an error; tests call it so

    if __name__ == "__main__":
        sys.exit(main())
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence

DEBUG_ENV = "DINO_UGS_DEBUG"
EXIT_USER_ERROR = 2  # unusable input: config, data, checkpoint, evaluation input

# The project's errors, as (module, class name). Only classes of modules already imported are
# looked up: an error cannot come from a module that was never loaded, and a light tool (e.g.
# tools/evaluate.py) does not pay for importing torch to handle its errors.
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("configs.overrides", "ConfigError"),
    ("datasets.coco", "DatasetError"),
    ("datasets.visdrone", "VisDroneFormatError"),
    ("datasets.coco_eval", "CocoEvalError"),
    ("util.checkpoint", "CheckpointError"),
    ("util.engine", "NonFiniteLossError"),
    ("util.weight_downloads", "WeightsDownloadError"),
    ("ops.build", "MSDABuildError"),
)


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    """`--debug`: show the traceback of an error instead of its message alone."""
    parser.add_argument("--debug", action="store_true",
                        help=f"on an error, show the full traceback (or set {DEBUG_ENV}=1)")


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def user_error_types() -> tuple[type[BaseException], ...]:
    """The project's error classes among the modules loaded so far."""
    found = []
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def error_message(exc: BaseException) -> str:
    """`error: <message>` plus how to see the traceback."""
    text = str(exc).strip() or type(exc).__name__
    return f"error: {text}\n(add --debug or set {DEBUG_ENV}=1 to see the traceback)"


def run_entry_point(main: Callable[[list[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; the project's own errors become a message on stderr and exit status 2."""
    try:
        return int(main(None if argv is None else list(argv)) or 0)
    except Exception as exc:
        shown = sys.argv[1:] if argv is None else list(argv)
        if debug_requested(shown) or not isinstance(exc, user_error_types()):
            raise
        print(error_message(exc), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


def entry_point(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorator form of run_entry_point for a tool's `main(argv=None) -> int`."""
    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        return run_entry_point(main, argv)
    return wrapper
