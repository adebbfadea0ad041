"""Augment and filter as batch stages: Ray Data actor classes, also used in-process.

:class:`AugmentStage` wraps the :class:`~dda_ray.augment.augmenter.Augmenter` with a disk cache of
variations, one ``.npy`` file per original image under
``<cache_dir>/<key>/<image id>-<hash of its pixels>.npy``, where ``key`` hashes everything else
that determines the variations: backend, model (for a local directory also its files' sizes and
modification times, so a retrained prior at the same path is a new key), strength, guidance,
steps, number of variations, seed and image size (and, for ``sd_image_variations`` at strength 1, a
tag for its stock-pipeline semantics). The pixel hash matters because ids repeat
across runs sharing the cache: rounds with the student are numbered alike in every run, but each
run's student makes different images.
A hit skips diffusion; a miss is computed and written atomically; the diffusion pipeline is loaded
at the stage's first miss (an actor whose parents are all cached never imports diffusers). So:

* later epochs only diffuse images they have not seen (the new round's),
* Tune trials that share (strength, guidance, model, seed) share the work,
* a restarted actor redoes at most its unfinished batch, with identical pixels (the
  Augmenter's seeds are per (seed, image id, variation)).

:class:`FilterStage` wraps the :class:`~dda_ray.augment.filter.CosineFilter` and drops rejected
variations (originals always pass); it is recomputed every epoch because it is cheap and
keeps ``filter.threshold`` free. Both stages append one JSON line per batch (time, rows,
cache hits, kept/rejected counts) under ``<run_dir>/stream/``: the streaming proof and the
per-epoch kept fraction come from these lines.

Rows travel between the stages as Ray Data batches of numpy columns; images as raw bytes, the
bank's encoding (:mod:`dda_ray.data.columns`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, config_from_dict
from ..data.columns import decode_image_column, encode_image_column, stack_vector_column
from ..data.pool import ORIGINAL
from ..runtime import append_jsonl, atomic_write


# ----------------------------------------------------------------- the stages
def augment_cache_key(cfg: Config) -> str:
    a = cfg.augment
    model = a.model
    if Path(model).exists():
        root = Path(model).resolve()
        files = sorted(p for p in root.rglob("*") if p.is_file())
        model = [str(root), [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    fields = [a.backend, model, a.strength, a.guidance, a.steps, a.num_variations, a.seed, a.prompt_template, a.image_resolution]
    fields.append(cfg.data.image_size)
    if a.backend == "sd_image_variations" and a.strength >= 1.0:
        # Strength 1 on this backend became the stock pipeline (pure-noise start, no VAE encode): a new key, so caches
        # written when it was SDEdit from the first timestep are never read back. Every other key is unchanged.
        fields.append("stock-image-variations")
    return hashlib.sha1(json.dumps(fields).encode()).hexdigest()[:16]


def augment_cache_root(cfg: Config) -> Path:
    """``augment.cache_dir``, or ``<output_dir>/cache/augment``: the folder of every setting's cache."""
    root = Path(cfg.augment.cache_dir) if cfg.augment.cache_dir else Path(cfg.run.output_dir) / "cache" / "augment"
    return root.expanduser().resolve()


def augment_cache_dir(cfg: Config) -> Path:
    return augment_cache_root(cfg) / augment_cache_key(cfg)


def _stream_log(cfg: Config, stage: str) -> Path:
    """Each actor process appends to its own file, so writers never share one."""
    d = cfg.run_dir.resolve() / "stream"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{stage}-{os.getpid()}.jsonl"


def _image_shape(cfg: Config) -> tuple[int, int, int]:
    return (cfg.data.image_size, cfg.data.image_size, 3)


def stage_device(requested: str, gpus: float, gpu_ids: list | None, cuda_available: bool | None = None) -> torch.device:
    """Where an augment/filter stage runs its model. ``requested``: an explicit device is taken as
    given; ``auto`` in a Ray actor (``gpu_ids``: ``ray.get_gpu_ids()``) is the GPU Ray assigned when the
    stage reserves GPUs (``*_gpus > 0``; Ray narrows ``CUDA_VISIBLE_DEVICES`` to it, so ``cuda:0``),
    else the CPU, never a GPU the actor did not reserve. Outside Ray (``gpu_ids`` None: the local
    engine), ``auto`` is CUDA when there is one."""
    if requested != "auto":
        return torch.device(requested)
    if gpu_ids is None:
        cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
        return torch.device("cuda" if cuda else "cpu")
    return torch.device("cuda:0") if gpus > 0 and len(gpu_ids) > 0 else torch.device("cpu")


def _ray_gpu_ids() -> list | None:
    """This Ray actor's assigned GPU ids; None outside a Ray actor (the local engine's stages)."""
    import ray

    return ray.get_gpu_ids() if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None else None


class AugmentStage:
    """Ray Data actor: epoch-pool slots in (:mod:`dda_ray.data.pool`), one image per slot out:
    the original, or the parent's k-th variation (all k made at the parent's first slot, cached on disk).

    Output columns: ``id``, ``parent_id``, ``image`` (raw bytes), ``label``, ``variation``
    (-1 for originals), ``parent_embedding`` (the bank's teacher embedding of the original) and,
    while ``filter.grid_batches > 0``, ``parent_image`` (for the filter's grids; the filter drops it).
    """

    def __init__(self, cfg_dict: dict, class_names: list[str] | None = None):
        from ..runtime import mark, set_threads

        self.cfg = config_from_dict(cfg_dict)
        mark(self.cfg.run_dir, "augment_init")
        set_threads(self.cfg.resources.torch_threads)
        self.class_names = class_names
        self._augmenter = None  # loaded at the first cache miss: see `augmenter`
        self.cache = augment_cache_dir(self.cfg)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.log = _stream_log(self.cfg, "augment")
        self.totals = {"parents": 0, "cache_hits": 0}  # over this actor's life (the local engine reads them)
        mark(self.cfg.run_dir, "augment_ready")

    @property
    def augmenter(self):
        """The :class:`~dda_ray.augment.augmenter.Augmenter`, built on first use (the first cache miss): an actor
        whose parents are all in the cache (a Tune trial with seen (strength, guidance), a later pass
        over the stream) never imports diffusers nor loads the pipeline. (A bad ``augment.model`` is
        caught before the run by the jobs' preflight; here it fails the first batch that needs it.)"""
        if self._augmenter is None:
            from ..augment.augmenter import Augmenter
            from ..runtime import mark

            mark(self.cfg.run_dir, "prior_load_start")
            if not self.cfg.run.verbose:
                from diffusers.utils import logging as diffusers_logging

                diffusers_logging.disable_progress_bar()  # "Loading pipeline components" in every actor
            device = stage_device(self.cfg.augment.device, self.cfg.resources.augment_gpus, _ray_gpu_ids())
            self._augmenter = Augmenter(dataclasses.replace(self.cfg.augment, device=str(device)), self.class_names)
            mark(self.cfg.run_dir, "prior_loaded")
        return self._augmenter

    @property
    def loaded(self) -> bool:
        """Whether this stage has loaded its diffusion pipeline (only a cache miss does)."""
        return self._augmenter is not None

    def _entry(self, pid: str, image: np.ndarray) -> str:
        # Ids repeat across runs and trials sharing the cache (a round with the student is numbered
        # alike everywhere, but each run's student makes different pixels): key on the content too.
        return f"{pid}-{hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]}"

    def _cached(self, entry: str) -> np.ndarray | None:
        path = self.cache / f"{entry}.npy"
        if not path.exists():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a damaged entry is recomputed
        return arr if arr.shape == (self.cfg.augment.num_variations, *_image_shape(self.cfg)) else None

    def _store(self, entry: str, variations: np.ndarray) -> None:
        atomic_write(self.cache / f"{entry}.npy", lambda tmp: np.save(tmp, variations))

    def __call__(self, batch: dict) -> dict:
        """Slot rows in (``variation`` -1: pass the original on; k: make the parent's k-th
        variation); bank rows without a ``variation`` column are first expanded to all their slots."""
        k = self.cfg.augment.num_variations
        if "variation" not in batch:
            batch = expand_slots(batch, k)
        t0 = time.time()
        images = decode_image_column(batch["image"], _image_shape(self.cfg))
        parent_ids = np.asarray(batch["parent_id"]).astype(str)
        labels = np.asarray(batch["label"], dtype=np.int64)
        variation = np.asarray(batch["variation"], dtype=np.int64)
        wanted = np.flatnonzero(variation != ORIGINAL)
        # one cache entry per distinct parent (all its k variations are made, and cached, together)
        entry = {int(i): self._entry(parent_ids[i], images[i]) for i in wanted}
        first: dict[str, int] = {}
        for i, e in entry.items():
            first.setdefault(e, i)
        made: dict[str, np.ndarray | None] = {e: self._cached(e) for e in first}
        miss = [e for e, v in made.items() if v is None]
        if miss:
            rows = np.array([first[e] for e in miss])
            out = self.augmenter.augment(images[rows], labels[rows], parent_ids[rows])
            fresh = out["image"].reshape(len(miss), k, *images.shape[1:])
            for j, e in enumerate(miss):
                self._store(e, fresh[j])
                made[e] = fresh[j]
        result_images = images.copy()
        for i, e in entry.items():
            result_images[i] = made[e][variation[i]]
        result = {
            "id": np.asarray(batch["id"]).astype(str),
            "parent_id": parent_ids,
            "image": encode_image_column(result_images),
            "label": labels,
            "variation": variation,
        }
        if self.cfg.filter.grid_batches > 0:  # the filter's grids show each variation beside its original
            result["parent_image"] = encode_image_column(images)
        if "teacher_embedding" in batch:  # the parent's embedding: the filter's reference
            result["parent_embedding"] = stack_vector_column(batch["teacher_embedding"])
        if "pass" in batch:  # which pass over the pool the slot belongs to (the trainer's batches end with each pass)
            result["pass"] = np.asarray(batch["pass"], dtype=np.int64)
        # Logged when computed, not when delivered: a batch re-run after its actor died is logged
        # twice here (kept/rejected counts come from the filter's log, which sees it once).
        append_jsonl(self.log, {"t0": t0, "t1": time.time(), "parents": len(first), "variations": len(wanted), "cache_hits": len(first) - len(miss)})
        self.totals["parents"] += len(first)
        self.totals["cache_hits"] += len(first) - len(miss)
        return result


def expand_slots(batch: dict, num_variations: int) -> dict:
    """Bank rows -> every slot of each row: the original, then its ``num_variations`` variations
    (ids ``<id>-v<k>``), each slot row carrying its parent's columns."""
    ids = np.asarray(batch["id"]).astype(str)
    reps = num_variations + 1
    variation = np.tile(np.arange(-1, num_variations, dtype=np.int64), len(ids))
    parent = np.repeat(ids, reps)
    out = {name: _repeat(col, reps) for name, col in batch.items() if name not in ("id", "parent_id", "variation")}
    out["id"] = np.array([p if v == ORIGINAL else f"{p}-v{v}" for p, v in zip(parent, variation, strict=True)], dtype=str)
    out["parent_id"] = parent
    out["variation"] = variation
    return out


def _repeat(column, reps: int):
    if isinstance(column, np.ndarray):
        return np.repeat(column, reps, axis=0)
    return [v for v in column for _ in range(reps)]


class FilterStage:
    """Ray Data actor: scores variations against their originals, drops the rejected ones.

    Output columns: ``id``, ``parent_id``, ``image`` (raw bytes), ``label``, ``variation``, ``score``.
    """

    def __init__(self, cfg_dict: dict):
        from ..augment.filter import CosineFilter
        from ..models.checkpoint import load_teacher
        from ..runtime import mark, set_threads

        self.cfg = config_from_dict(cfg_dict)
        mark(self.cfg.run_dir, "filter_init")
        set_threads(self.cfg.resources.torch_threads)
        teacher, normalize, _ = load_teacher(self.cfg)
        res = self.cfg.resources
        # a fused actor reserves the augment pool's GPUs, a filter actor its own
        gpus = res.augment_gpus if res.fused_stages else res.filter_gpus
        device = stage_device("auto", gpus, _ray_gpu_ids())
        self.filter = CosineFilter(self.cfg.filter, teacher, normalize, device=device, image_shape=_image_shape(self.cfg))
        self.log = _stream_log(self.cfg, "filter")
        self.grids_left = self.cfg.filter.grid_batches  # per actor; pools are rebuilt every epoch
        self.last_report = None  # the last batch's FilterReport (the local engine counts from it)
        mark(self.cfg.run_dir, "filter_ready")

    def __call__(self, batch: dict) -> dict:
        t0 = time.time()
        # a batch with every variation rejected is counted in the log line, and said once per epoch (filter.all_rejected_line)
        out, report = self.filter.filter(batch, warn=False)
        self.last_report = report
        if self.grids_left > 0 and report.n_variations:
            from ..augment.grids import save_grid

            self.grids_left -= 1
            save_grid(self.cfg.run_dir.resolve() / "grids", f"filter-{int(t0)}-{os.getpid()}", out, image_shape=_image_shape(self.cfg))
        kept = np.asarray(out["kept"], dtype=bool)
        append_jsonl(
            self.log,
            {
                "t0": t0,
                "t1": time.time(),
                "variations": report.n_variations,
                "kept": report.n_kept,
                "rejected": report.n_variations - report.n_kept,
                "all_rejected": int(report.all_rejected),
                "max_score": None if not report.n_variations else report.max_score,
                "hist": report.to_dict().get("hist"),
            },
        )
        return {c: np.asarray(out[c])[kept] for c in ("id", "parent_id", "image", "label", "variation", "score", "pass") if c in out}


class FusedStage:
    """Ray Data actor running :class:`AugmentStage` then :class:`FilterStage` in one process.

    Selected by ``resources.fused_stages`` (sized by the ``augment_*`` resources). One pool
    instead of two: the unfiltered rows (rejected variations included) never cross
    the object store, but augmentation and filtering of consecutive batches no longer overlap
    on different actors, and both models share one actor's memory (and GPU). Output columns
    are :class:`FilterStage`'s.
    """

    def __init__(self, cfg_dict: dict, class_names: list[str] | None = None):
        self.augment = AugmentStage(cfg_dict, class_names)
        self.filter = FilterStage(cfg_dict)

    def __call__(self, batch: dict) -> dict:
        return self.filter(self.augment(batch))


def read_stream_stats(run_dir: Path, since: float = 0.0) -> dict:
    """Totals of the augment/filter lines written after ``since`` (epoch start)."""
    d = Path(run_dir) / "stream"
    totals = {"variations": 0, "kept": 0, "rejected": 0, "cache_hits": 0, "parents": 0, "filter_batches": 0, "all_rejected_batches": 0}
    worst = []  # the best score of each batch the filter rejected whole
    for path in d.glob("*.jsonl") if d.exists() else []:
        stage = path.name.split("-")[0]
        if stage not in ("augment", "filter"):
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if rec.get("t0", 0) < since:
                continue
            if stage == "filter":
                for key in ("kept", "rejected"):
                    totals[key] += rec[key]
                totals["variations"] += rec["variations"]
                if rec["variations"]:
                    totals["filter_batches"] += 1
                if rec.get("all_rejected"):
                    totals["all_rejected_batches"] += 1
                    if rec.get("max_score") is not None:
                        worst.append(rec["max_score"])
            else:
                totals["cache_hits"] += rec["cache_hits"]
                totals["parents"] += rec["parents"]
    totals["kept_fraction"] = totals["kept"] / totals["variations"] if totals["variations"] else float("nan")
    totals["all_rejected_max_score"] = max(worst) if worst else None
    return totals


def local_augment_fn(cfg: Config, class_names: list[str] | None = None):
    """The same stages, in-process, for ``run.engine=local``: BankBatch -> (variations (N, K, H, W, C),
    kept (N, K) bool, stats). ``class_names``: the teacher's (``sd_img2img`` prompts), as the Ray
    engine passes them to its augment actors."""
    augment = AugmentStage(cfg.to_dict(), class_names)
    filt = FilterStage(cfg.to_dict())
    k = cfg.augment.num_variations
    shape = _image_shape(cfg)

    def fn(bank):
        before = dict(augment.totals)
        n = len(bank)
        variations = np.zeros((n, k, *shape), dtype=np.uint8)
        kept = np.zeros((n, k), dtype=bool)
        index = {pid: i for i, pid in enumerate(np.asarray(bank.ids).astype(str))}
        step = cfg.augment.batch_size
        batches = rejected_whole = 0
        worst = []
        for s in range(0, n, step):
            rows = {"id": bank.ids[s : s + step], "image": bank.images[s : s + step], "label": bank.labels[s : s + step], "teacher_embedding": bank.teacher_embedding[s : s + step]}
            slots = expand_slots(rows, k)
            only_variations = slots["variation"] != ORIGINAL
            out = augment({c: v[only_variations] if isinstance(v, np.ndarray) else [x for x, m in zip(v, only_variations, strict=True) if m] for c, v in slots.items()})
            imgs = decode_image_column(out["image"], shape)
            parents = np.array([index[p] for p in out["parent_id"]])
            variations[parents, out["variation"]] = imgs
            passed = filt(out)
            report = filt.last_report
            batches += bool(report.n_variations)
            if report.all_rejected:
                rejected_whole += 1
                worst.append(report.max_score)
            kept[np.array([index[p] for p in passed["parent_id"]], dtype=np.int64), np.asarray(passed["variation"], dtype=np.int64)] = True
        stats = {"variations": n * k, "kept": int(kept.sum())}
        stats["kept_fraction"] = stats["kept"] / stats["variations"] if stats["variations"] else float("nan")
        stats["cache_hits"] = augment.totals["cache_hits"] - before["cache_hits"]
        stats["diffused"] = augment.totals["parents"] - before["parents"] - stats["cache_hits"]
        stats.update(filter_batches=batches, all_rejected_batches=rejected_whole, all_rejected_max_score=max(worst) if worst else None)
        return variations, kept, stats

    return fn
