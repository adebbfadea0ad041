"""The shared command line of every job: ``--config FILE`` plus ``section.field=value`` overrides.

``--help`` lists every config section and field with its default (generated from the config
dataclasses); ``--print-config`` prints the resolved config as YAML and exits 0 without running.

Errors a user can fix (bad config, missing data, refused checkpoint, existing run dir, ...)
print one ``error:`` line and exit with status 2 instead of a traceback.

SIGINT (Ctrl-C) and SIGTERM stop a job with one ``interrupted:`` line naming the last complete
checkpoint and the command to resume, and exit status 128 + signal (130, 143). Nothing is
half-written: every checkpoint, round and final file is written to a temporary name and renamed
into place, and a resumed run first drops what the interrupted epoch left (``runtime.rewind_run``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import Config, ConfigError, config_reference, load_config
from ..progress import set_mode as set_progress_mode


def user_errors() -> tuple[type[BaseException], ...]:
    from ..augment.filter import AllRejectedError
    from ..data.datasets import DatasetError
    from ..models.checkpoint import CheckpointError
    from ..runtime import RunDirExistsError

    # TrackingError and AugmentError are ConfigErrors
    errors: list[type[BaseException]] = [ConfigError, DatasetError, CheckpointError, RunDirExistsError, AllRejectedError]
    try:
        from ..data.bank import BankError

        errors.append(BankError)
    except ImportError:
        pass
    return tuple(errors)


class JobInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds the job like Ctrl-C (Ray and the loop clean up as for it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def one_line(error: BaseException) -> str:
    """A user error as one line (some carry a list, e.g. every archive format tried)."""
    return "; ".join(line.strip(" -") for line in str(error).splitlines() if line.strip(" -"))


def _raise_interrupted(signum, frame) -> None:
    raise JobInterrupted(signum)


def interrupted_message(run_dir: Path | None, signum: int) -> str:
    import signal

    name = signal.Signals(signum).name
    if run_dir is None:
        return f"interrupted: {name} before the run started; nothing was written"
    state = run_dir / "state.pt"
    if not state.exists():
        return f"interrupted: {name}; {run_dir} holds no complete epoch yet (rerun with run.resume=true to reuse its bank)"
    try:
        import torch

        where = f"after epoch {int(torch.load(state, map_location='cpu', weights_only=True)['epoch'])}"
    except Exception:  # noqa: BLE001 - the message must not fail; the file is written atomically anyway
        where = "state.pt"
    return f"interrupted: {name}; the last complete checkpoint is {state} ({where}); rerun the same command with run.resume=true to continue"


def _nothing_written(run_dir: Path) -> bool:
    """True when ``run_dir`` holds only its ``config.yaml``, ``timeline.jsonl``, ``mlflow_run.json`` and empty folders
    (e.g. ``stream/``, made when a stage starts): a run that failed before any output, safe to remove."""
    from ..tracking import RUN_FILE

    if not run_dir.is_dir():
        return False
    for path in run_dir.rglob("*"):
        if path.is_dir():
            continue
        if path.parent != run_dir or path.name not in ("config.yaml", "timeline.jsonl", RUN_FILE):
            return False
    return True


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h {rest // 60:02d}m {rest % 60:02d}s" if h else f"{rest // 60}m {rest % 60:02d}s"


def summary_block(job: str, cfg: Config, result: object, run: tuple[str, str, str] | None, seconds: float) -> str:
    """The block every job prints when it finishes: its result, where its files and its MLflow run are, how long it took."""
    from ..tracking import run_location

    rows: list[tuple[str, str]] = []
    res = result if isinstance(result, dict) else {}
    if res.get("trial_id") is not None:
        rows.append(("best trial", str(res["trial_id"])))
    if isinstance(res.get("test_acc"), (int, float)):
        rows.append(("best test accuracy" if "trial_id" in res else "test accuracy", f"{res['test_acc']:.2f} %"))
    if isinstance(res.get("final_loss"), (int, float)):
        rows.append(("final loss", f"{res['final_loss']:.4f}"))
    rows.append(("run directory", str(cfg.run_dir.expanduser().resolve())))
    for name in ("student", "teacher"):
        if (cfg.run_dir / name / "meta.json").exists():
            rows.append((name, str((cfg.run_dir / name).expanduser().resolve())))
    if "final_loss" in res:  # train_prior: the pipeline is written to augment.model
        rows.append(("prior", str(Path(cfg.augment.model).expanduser().resolve())))
    if res.get("best_yaml"):
        rows.append(("best config", str(res["best_yaml"])))
    if run is not None:
        rows.append(("MLflow", run_location(*run)))
    else:
        why = "tracking.enabled=false" if not cfg.tracking.enabled else "see the warning above"
        rows.append(("MLflow", f"not tracked ({why})"))
    rows.append(("wall time", _duration(seconds)))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"== {job} finished ==", *(f"  {k:<{width}}  {v}" for k, v in rows)])


def build_parser(description: str | None = None, options: list[tuple[list[str], dict]] | None = None) -> argparse.ArgumentParser:
    """The jobs' parser; ``options`` (``([flags], add_argument kwargs)``) add job-specific flags."""
    parser = argparse.ArgumentParser(
        description=description, epilog=config_reference(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML preset under configs/ (defaults apply when omitted)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (preset + overrides) as YAML and exit"
    )
    parser.add_argument("--verbose", action="store_true", help="Ray's own INFO logs and Ray Data progress bars (run.verbose=true)")
    for flags, kwargs in options or []:
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. distill.epochs=3 augment.strength=0.5")
    return parser


def parse_args(
    argv: list[str] | None = None, description: str | None = None, options: list[tuple[list[str], dict]] | None = None
) -> tuple[Config, argparse.Namespace]:
    args = build_parser(description, options).parse_args(argv)
    return load_config(args.config, [*args.overrides, *(["run.verbose=true"] if args.verbose else [])]), args


def run_job(
    fn: Callable[[Config], object],
    description: str | None = None,
    argv: list[str] | None = None,
    prepare_dir: bool = True,
    preflight: Callable[[Config], None] | None = None,
    options: list[tuple[list[str], dict]] | None = None,
    job: str = "job",
) -> object:
    """Parse, validate, ``preflight`` (cheap checks), create the run directory, run ``fn``.

    ``--print-config`` prints the validated config as YAML and returns None: nothing else runs
    and nothing is written. A job that finishes prints :func:`summary_block` (``job`` names it):
    its accuracy (or loss), run directory, MLflow run and wall time.

    A user error prints one ``error:`` line and exits 2; a run directory this call created is
    removed again if the job fails on a user error (or is interrupted) before writing anything
    but its config (empty folders a stage made ahead of its first output count as nothing).
    """
    import shutil
    import signal
    import threading
    import time

    from ..runtime import prepare_run_dir
    from ..tracking import started_runs

    t0 = time.monotonic()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _raise_interrupted)
    created = None
    run_dir = None
    try:
        cfg, args = parse_args(argv, description, options)
        if args.print_config:
            print(cfg.to_yaml(), end="", flush=True)
            return None
        # bars on a terminal, plain lines in a job's log (run.progress); the resolved mode is what child processes get
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=set_progress_mode(cfg.run.progress)))
        if preflight is not None:
            preflight(cfg)
        if prepare_dir:
            created = None if cfg.run_dir.exists() else cfg.run_dir
            prepare_run_dir(cfg)
            run_dir = cfg.run_dir
        first_run = len(started_runs())
        result = fn(cfg)
        runs = started_runs()[first_run:]
        try:
            print(summary_block(job, cfg, result, runs[0] if runs else None, time.monotonic() - t0), flush=True)
        except Exception as e:  # noqa: BLE001 - the job is done; a summary must not turn it into a failure
            print(f"== {job} finished (no summary: {type(e).__name__}: {e}) ==", flush=True)
        return result
    except user_errors() as e:
        if created is not None and _nothing_written(created):
            shutil.rmtree(created, ignore_errors=True)
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, JobInterrupted) else signal.SIGINT
        if created is not None and _nothing_written(created):
            shutil.rmtree(created, ignore_errors=True)
            run_dir = None
        print(interrupted_message(run_dir, signum), file=sys.stderr, flush=True)
        raise SystemExit(128 + int(signum)) from None
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
