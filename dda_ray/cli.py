"""The shared command line of every job: ``--config FILE`` plus ``section.field=value`` overrides.

Errors a user can fix (bad config, missing data, refused checkpoint, existing run dir, ...)
print one ``error:`` line and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .config import Config, ConfigError, load_config


def user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .data.datasets import DatasetError
    from .runtime import RunDirExistsError

    errors: list[type[BaseException]] = [ConfigError, DatasetError, CheckpointError, RunDirExistsError]  # TrackingError, AugmentError: ConfigErrors
    try:
        from .data.bank import BankError

        errors.append(BankError)
    except ImportError:
        pass
    return tuple(errors)


def parse_args(argv: list[str] | None = None, description: str | None = None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset under configs/ (defaults apply when omitted)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. distill.epochs=3 augment.strength=0.5")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides), args


def run_job(fn: Callable[[Config], object], description: str | None = None, argv: list[str] | None = None, prepare_dir: bool = True) -> object:
    from .runtime import prepare_run_dir

    try:
        cfg, _ = parse_args(argv, description)
        if prepare_dir:
            prepare_run_dir(cfg)
        return fn(cfg)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
