"""The single-process DFKD pipeline: synthesis -> (augment + filter) -> KD, no Ray.

Fast to test and to debug; the Ray pipeline calls the very same pieces (Synthesizer,
Distiller, train_loop) with a streaming source.
"""

from __future__ import annotations

import json
import time

from .checkpoint import fingerprint, load_teacher, save_classifier
from .config import Config
from .data import load_data
from .distill import Distiller, global_rng_state, load_training_state, rotation_every, save_training_state, set_global_rng_state, train_loop
from .evaluation import evaluate
from .models import build_model
from .runtime import append_jsonl, resolve_device, rewind_run, seed_everything, set_threads, write_text_atomic
from .sources import AugmentFn, BankSource, RealSource, build_initial_bank, load_bank_rows, resume_extra
from .synthesis import build_synthesizer
from .tracking import Tracker


def run_local(cfg: Config, augment: AugmentFn | None = None, progress: bool = True, tracker: Tracker | None = None) -> dict:
    """Run ``cfg.run.mode`` end to end in this process; returns the final metrics.

    Writes into ``cfg.run_dir``: ``bank/`` (unless ``synthesis.bank_dir`` points elsewhere),
    ``rounds/`` (rounds with the student), ``metrics.jsonl`` (one line per epoch),
    ``metrics.json`` (final), ``state.pt`` (resume point) and ``student/`` (final checkpoint).
    """
    set_threads(cfg.resources.torch_threads)
    device = resolve_device("auto" if cfg.resources.use_gpu else "cpu")
    gen = seed_everything(cfg.run.seed)
    run_dir = cfg.run_dir
    timings: dict[str, float] = {}

    teacher, normalize, _ = load_teacher(cfg)
    data = load_data(cfg.data, progress)
    test = data.test.subset(cfg.data.eval_subset, cfg.run.seed)
    student = build_model(cfg.student.arch, cfg.data.num_classes)
    distiller = Distiller(student, teacher, normalize, cfg.data.num_classes, cfg.distill, cfg.synthesis.rotation_lr, device, rotation_every=rotation_every(cfg))

    # Resume before the source reads the rounds on disk: rounds and metrics lines written after
    # the last checkpoint (an interrupted epoch) are dropped and redone identically.
    state_file = run_dir / "state.pt"
    start_epoch, extra = 0, {}
    if cfg.run.resume and state_file.exists():
        start_epoch, extra = load_training_state(state_file, distiller, gen)
        rng = (global_rng_state(), gen.get_state())
        rewind_run(run_dir, start_epoch, extra.get("next_round") if cfg.run.mode != "real_kd" else None)
        print(f"resuming distillation after epoch {start_epoch}")

    if cfg.run.mode == "real_kd":
        source = RealSource(data.train.subset(cfg.data.train_subset, cfg.run.seed), cfg.distill.batch_size, cfg.run.seed, cfg.distill.steps_per_epoch is None)
    else:
        synthesizer = build_synthesizer(cfg, teacher, normalize, device)
        t0 = time.perf_counter()
        build_initial_bank(cfg, synthesizer, progress)  # fast: leaves the synthesizer at the bank's end of the chain
        timings["bank_s"] = time.perf_counter() - t0
        if "synthesizer" in extra:  # resuming: the chain as it was after the last checkpoint's rounds
            synthesizer.load_state_dict(extra["synthesizer"])
        source = BankSource(cfg, load_bank_rows(cfg, fingerprint(teacher)), synthesizer, augment if cfg.run.mode == "dda" else None, progress)

    def report(metrics: dict, epoch: int) -> None:
        append_jsonl(run_dir / "metrics.jsonl", {**metrics, **timings})
        if tracker is not None:
            tracker.log_metrics(metrics, step=epoch + 1)
        save_training_state(state_file, distiller, epoch + 1, resume_extra(source), gen)

    if start_epoch:  # building the source drew from the global RNG: continue from the checkpoint's draws
        set_global_rng_state(rng[0])
        gen.set_state(rng[1])
    t0 = time.perf_counter()
    metrics = train_loop(distiller, source, lambda m: evaluate(m, test, normalize, device=device), report, start_epoch, gen, progress)
    timings["distill_s"] = time.perf_counter() - t0
    final = {**metrics, **timings, "mode": cfg.run.mode}
    write_text_atomic(run_dir / "metrics.json", json.dumps(final, indent=2))
    mean, std = normalize.mean.flatten().tolist(), normalize.std.flatten().tolist()
    save_classifier(distiller.student_module, run_dir / "student", arch=cfg.student.arch, num_classes=cfg.data.num_classes, mean=mean, std=std, accuracy=metrics.get("test_acc"), mode=cfg.run.mode)
    return final


__all__ = ["run_local"]
