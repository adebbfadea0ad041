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
    from .filter import AllRejectedError
    from .runtime import RunDirExistsError

    # TrackingError and AugmentError are ConfigErrors
    errors: list[type[BaseException]] = [ConfigError, DatasetError, CheckpointError, RunDirExistsError, AllRejectedError]
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


def run_job(
    fn: Callable[[Config], object],
    description: str | None = None,
    argv: list[str] | None = None,
    prepare_dir: bool = True,
    preflight: Callable[[Config], None] | None = None,
) -> object:
    """Parse, validate, ``preflight`` (cheap checks), create the run directory, run ``fn``.

    A user error prints one ``error:`` line and exits 2; a run directory this call created is
    removed again if the job fails on a user error before writing anything but its config.
    """
    import shutil

    from .runtime import prepare_run_dir

    created = None
    try:
        cfg, _ = parse_args(argv, description)
        if preflight is not None:
            preflight(cfg)
        if prepare_dir:
            created = None if cfg.run_dir.exists() else cfg.run_dir
            prepare_run_dir(cfg)
        return fn(cfg)
    except user_errors() as e:
        if created is not None and created.exists() and {p.name for p in created.iterdir()} <= {"config.yaml"}:
            shutil.rmtree(created, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
