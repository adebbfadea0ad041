"""THE run driver: one orchestration of a distillation run, for both engines.

::

    drive(cfg, engine)
      threads, seed (run.seed + rank), device          engine.device()
      teacher, data, student, Distiller                engine.wrap() (DDP with several Ray Train workers)
      resume: engine.restored() (Ray Train's checkpoint after a worker failure), else <run_dir>/state.pt
              with run.resume=true or on a Ray Train restart; rewind_run drops what the cut epoch left
              (metrics lines, rounds)
      rank 0: the Synthesizer, the initial bank made    initial_bank.run_synthesizer
      the rows                                         engine.source(): BankSource / RealSource (local),
                                                       RaySource (a Ray Train worker's shard)
      distill.train_loop; after each epoch: metrics.jsonl, MLflow, state.pt (rank 0), then engine.report()
      rank 0: metrics.json + student/

An engine supplies only where rows come from and how an epoch's report leaves the process
(:class:`Engine`; the local engine is :mod:`dda_ray.engines.local`, the Ray Train engine is
:mod:`dda_ray.engines.ray_train`). So both engines report the same metrics, with the same meanings, and
resume the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..data.bank import round_of
from ..runtime import write_text_atomic
from .kd import (
    Distiller,
    TrainSource,
    global_rng_state,
    load_training_state,
    rotation_every,
    save_training_state,
    set_global_rng_state,
    train_loop,
)


@dataclass
class RunParts:
    """What the driver has set up when it asks the engine for its source of rows."""

    cfg: Config
    teacher: torch.nn.Module
    normalize: object
    meta: dict
    data: object  # dda_ray.data.SplitDataset
    device: torch.device
    distiller: Distiller
    synthesizer: object | None  # rank 0 in the synthetic modes; None elsewhere
    next_round: int | None  # the restored checkpoint's round counter (None: not resuming)
    progress: bool


class Engine:
    """What an engine supplies to :func:`drive`. The defaults are the single-process engine's."""

    rank = 0
    world_size = 1
    progress = True
    bank_s: float | None = None  # the initial bank was made before drive (the Ray driver process): its time
    # True: an attempt that finds no checkpoint of the engine's own resumes from <run_dir>/state.pt even
    # without run.resume (Ray Train restarting its workers: the directory is this run's, see
    # runtime.prepare_run_dir, and state.pt is written before each Ray checkpoint, so a worker lost
    # between the two would otherwise start the run again from epoch 0)
    resumes_run_dir = False

    def device(self, cfg: Config) -> torch.device:
        from ..runtime import resolve_device

        return resolve_device("auto" if cfg.resources.use_gpu else "cpu")

    def wrap(self) -> Callable[[torch.nn.Module], torch.nn.Module] | None:
        return None

    def restored(self, load: Callable[[Path], tuple[int, dict]]) -> tuple[int, dict] | None:
        """A checkpoint the engine itself restores (``load(path)`` reads one); None: none."""
        return None

    def kd_bar(self, cfg: Config):
        """The KD-step bar :func:`~dda_ray.distill.kd.train_loop` draws: a bool, or a tqdm-like class."""
        return self.progress

    def source(self, run: RunParts) -> TrainSource:
        raise NotImplementedError

    def report(self, metrics: dict, epoch: int, save_state: Callable[[Path], None]) -> None:
        """After the driver has recorded the epoch (``save_state(path)`` writes its checkpoint)."""


def drive(cfg: Config, engine: Engine, tracker=None) -> dict:
    """Run ``cfg.run.mode`` on ``engine`` from set-up to the final save; returns the final metrics.

    Writes into ``cfg.run_dir``: ``bank/`` (unless ``synthesis.bank_dir`` points elsewhere),
    ``rounds/`` (rounds with the student), ``metrics.jsonl`` (one line per epoch), ``metrics.json``
    (final), ``state.pt`` (resume point) and ``student/`` (final checkpoint).
    """
    from ..data import load_data
    from ..models import build_model
    from ..models.checkpoint import load_teacher, save_classifier
    from ..models.evaluation import evaluate
    from ..runtime import append_jsonl, mark, seed_everything, set_threads, write_text_atomic
    from ..synthesis.initial_bank import run_synthesizer
    from .sources import resume_extra

    lead, progress = engine.rank == 0, engine.progress
    log = (lambda s: print(s, flush=True)) if lead else (lambda s: None)
    step = (lambda event, **kw: mark(cfg.run_dir, event, **kw)) if lead else (lambda event, **kw: None)  # the timeline
    set_threads(cfg.resources.torch_threads)
    gen = seed_everything(cfg.run.seed + engine.rank)
    device = engine.device(cfg)
    teacher, normalize, meta = load_teacher(cfg)
    step("teacher_loaded")
    data = load_data(cfg.data, progress)
    test = data.test.subset(cfg.data.eval_subset, cfg.run.seed)
    step("data_loaded")
    student = build_model(cfg.student.arch, cfg.data.num_classes)
    distiller = Distiller(student, teacher, normalize, cfg.data.num_classes, cfg.distill, cfg.synthesis.rotation_lr, device, wrap=engine.wrap(), rotation_every=rotation_every(cfg), rotation_views=cfg.synthesis.rotation_views)

    # Resume before the source reads the rounds on disk: rounds and metrics lines written after
    # the last checkpoint (an interrupted or failed epoch) are dropped and redone identically.
    state_file = cfg.run_dir / "state.pt"
    start_epoch, extra = 0, {}
    restored = engine.restored(lambda path: load_training_state(path, distiller, gen))
    if restored is not None:
        start_epoch, extra = restored
    elif (cfg.run.resume or engine.resumes_run_dir) and state_file.exists():
        start_epoch, extra = load_training_state(state_file, distiller, gen)
    synthetic = cfg.run.mode != "real_kd"
    next_round = int(extra["next_round"]) if start_epoch and "next_round" in extra else None
    if lead:  # what an attempt cut after its last checkpoint left (cut before any: all it wrote); a fresh run: nothing
        rounds_from = (next_round if start_epoch else cfg.synthesis.init_rounds) if synthetic else None
        rewind_run(cfg.run_dir, start_epoch, rounds_from)
    if start_epoch:
        rng = (global_rng_state(), gen.get_state())
        print(f"[rank {engine.rank}] resuming after epoch {start_epoch}", flush=True)

    timings: dict[str, float] = {}
    synthesizer = None
    if synthetic and lead:
        t0 = time.perf_counter()
        synthesizer = run_synthesizer(cfg, (teacher, normalize), device, progress)  # fast: the chain at the bank's end
        timings["bank_s"] = engine.bank_s if engine.bank_s is not None else time.perf_counter() - t0
        if "synthesizer" in extra:  # resuming: the chain as it was after the last checkpoint's rounds
            synthesizer.load_state_dict(extra["synthesizer"])
    source = engine.source(RunParts(cfg, teacher, normalize, meta or {}, data, device, distiller, synthesizer, next_round, progress))
    step("source_ready")
    del data  # the source keeps what it trains on (real_kd: the train split); the rest is freed
    if start_epoch:  # setting up drew from the global RNG: continue from the checkpoint's draws
        set_global_rng_state(rng[0])
        gen.set_state(rng[1])

    def report(metrics: dict, epoch: int) -> None:
        extra = resume_extra(source) if lead else {}
        if lead:
            append_jsonl(cfg.run_dir / "metrics.jsonl", {**metrics, **timings})
            if tracker is not None:
                tracker.log_metrics(metrics, step=epoch + 1)
            save_training_state(state_file, distiller, epoch + 1, extra, gen)
        engine.report(metrics, epoch, lambda path: save_training_state(path, distiller, epoch + 1, extra, gen))
        step("epoch_reported", epoch=epoch + 1)

    t0 = time.perf_counter()
    metrics = train_loop(distiller, source, lambda m: evaluate(m, test, normalize, device=device), report, start_epoch, gen, engine.kd_bar(cfg), log)
    timings["distill_s"] = time.perf_counter() - t0
    final = {**metrics, **timings, "mode": cfg.run.mode}
    if lead:
        write_text_atomic(cfg.run_dir / "metrics.json", json.dumps(final, indent=2))
        mean, std = normalize.mean.flatten().tolist(), normalize.std.flatten().tolist()
        save_classifier(distiller.student_module, cfg.run_dir / "student", arch=cfg.student.arch, num_classes=cfg.data.num_classes, mean=mean, std=std, accuracy=metrics.get("test_acc"), mode=cfg.run.mode)
        step("final_saved")
    return final


def rewind_run(run_dir: str | Path, epochs_done: int, next_round: int | None) -> None:
    """Bring a run directory back to its last checkpoint before resuming from it.

    An interrupted or failed epoch may have appended its ``metrics.jsonl`` line or written its
    synthesis round before the checkpoint was saved. Lines of epochs after ``epochs_done`` (and
    a torn last line) are dropped, and rounds numbered ``>= next_round`` are removed: the resumed
    epoch re-synthesises them from the restored student with the same seeds, so the run continues
    exactly as if it had never stopped.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        keep = []
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the interruption
            if int(rec.get("epoch", 0)) <= epochs_done:
                keep.append(line)
        write_text_atomic(metrics, "".join(f"{line}\n" for line in keep))
    if next_round is not None:
        for path in sorted((run_dir / "rounds").glob("round-*.parquet")):
            if round_of(path) >= next_round:
                path.unlink()


__all__ = ["Engine", "RunParts", "drive", "rewind_run"]
