"""The Ray graph: bank (Parquet) -> augment actors -> filter actors -> Ray Train DDP distillation.

::

    BankDatasource (re-lists round files at every epoch's execution)
        -> map_batches(AugmentStage,  ActorPoolStrategy(size=resources.augment_actors), num_gpus=augment_gpus)
        -> map_batches(FilterStage,   ActorPoolStrategy(size=resources.filter_actors),  num_gpus=filter_gpus)
        -> TorchTrainer(datasets={"train": ds}): every worker runs the run driver (driver.drive,
           RayTrainEngine) on its shard, as the local engine does on its in-memory pool

    (``resources.fused_stages: true``: one pool of ``FusedStage`` actors, augment then filter in
    one process, sized by the ``augment_*`` resources, replaces the two pools.)

The Ray Data stages stream: training consumes filtered rows while augmentation is still
working through the bank. What is recomputed per epoch and what is cached:

* the bank (initial rounds + one round per epoch with the current student) is on disk;
* diffusion variations are cached per image on disk, keyed by (image id, backend, model,
  strength, guidance, steps, number of variations, seed) — see :mod:`dda_ray.engines.stages`. The
  first epoch pays for diffusion; later epochs only diffuse the new round's images;
* the filter (one teacher forward per variation) is recomputed every epoch: it is cheap and
  keeps the threshold a free knob for Tune trials sharing one cache.

Rounds with the student in the loop: at each epoch start rank 0 runs the synthesis round(s)
with the current student (DDP keeps every rank's student identical), writes the round's
Parquet file, and all ranks meet at a barrier; the epoch's execution then re-lists the bank
and the new images stream through augment/filter into that same epoch.

Uneven shards: the dataset is split with ``equal=False`` so no kept row is dropped; every
kept row is trained on once per epoch (``distill.steps_per_epoch: null``), and workers whose
shard ends first join DDP's uneven-input handling (``torch.distributed.algorithms.Join``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from functools import partial
from pathlib import Path

import torch

from ..config import Config, config_from_dict
from ..distill.driver import Engine
from ..progress import set_mode as set_progress_mode
from .pool_source import bank_pool, make_pool_datasource, real_pool, start_epoch_order
from .ray_source import RaySource
from .shared_disk import check_shared_paths, shared_paths

# ----------------------------------------------------------------- the graph
# A dead augment/filter actor (crash, preemption, OOM kill) is restarted and its unfinished
# batches re-run on the new actor; batches already handed on are in the object store. A batch the
# dead actor had finished but not yet handed on is run again (at least once upstream: the second
# run reads the variations the first one cached), yet reaches the trainer once: downstream no row
# is lost or duplicated, and the Augmenter's per-(seed, image id, variation) seeds make any
# recomputed variations identical. That is Ray Data's default for actor pools in 2.60
# (max_restarts=-1, max_task_retries=-1). It is not passed explicitly: map_batches takes those only
# through **ray_remote_args, deprecated in 2.60 (a RayDeprecationWarning, removal in 2.64).
# tests/engines/test_pipeline.py::test_actor_pools_restart_dead_actors_by_default pins the default instead,
# so a Ray upgrade that changes it fails a test rather than turning an actor loss into a failed run.

def stage_memory(cfg: Config, stage: str) -> int:
    """Bytes of host memory Ray reserves per ``augment`` / ``filter`` / ``fused`` actor or ``read``
    task (``resources.*_memory_gb``, or the backend's default)."""
    res = cfg.resources
    if stage == "fused":
        return stage_memory(cfg, "augment") + stage_memory(cfg, "filter")
    gib = getattr(res, f"{stage}_memory_gb")  # augment | filter | read
    if gib is None:
        gib = 1.5 if stage == "filter" else 2.0 if cfg.augment.backend == "local_prior" else 10.0
    return int(gib * 2**30)


def build_dataset(cfg: Config, class_names: list[str] | None = None):
    """The training stream for ``cfg.run.mode`` (lazy; executes once per epoch)."""
    import ray
    from ray.data import ActorPoolStrategy

    from ..synthesis.initial_bank import initial_bank_dir

    res = cfg.resources
    k = cfg.augment.num_variations if cfg.run.mode == "dda" else 0
    if cfg.run.mode == "real_kd":
        load = partial(real_pool, cfg.to_dict())
    else:
        load = partial(bank_pool, [str(initial_bank_dir(cfg)), *cfg.distill.extra_banks, str(cfg.run_dir / "rounds")])
    start_epoch_order(cfg.run_dir)  # the stream's order: set by the trainer each epoch, read by the read task
    ds = ray.data.read_datasource(make_pool_datasource(load, str(cfg.run_dir), cfg.run.seed, k), num_cpus=res.filter_cpus or 0.25, memory=stage_memory(cfg, "read"))
    if cfg.run.mode == "dda":
        from .stages import AugmentStage, FilterStage, FusedStage

        cfg_dict = cfg.to_dict()
        # The augment pool's actors (or the fused pool's: augment then filter in one actor).
        ds = ds.map_batches(
            FusedStage if res.fused_stages else AugmentStage,
            fn_constructor_kwargs={"cfg_dict": cfg_dict, "class_names": class_names},
            compute=ActorPoolStrategy(size=res.augment_actors),
            batch_size=cfg.augment.batch_size,
            num_cpus=res.augment_cpus,
            num_gpus=res.augment_gpus,
            memory=stage_memory(cfg, "fused" if res.fused_stages else "augment"),
            resources=res.augment_resources or None,
            batch_format="numpy",
        )
        if not res.fused_stages:
            # One augment batch per filter call: the augment stage hands on one row per slot it got, so a
            # filter batch of (k + 1) augment batches would hold the stream's first rows back until k + 1
            # augment batches were done (and every later block as long).
            ds = ds.map_batches(
                FilterStage,
                fn_constructor_kwargs={"cfg_dict": cfg_dict},
                compute=ActorPoolStrategy(size=res.filter_actors),
                batch_size=cfg.augment.batch_size,
                num_cpus=res.filter_cpus,
                num_gpus=res.filter_gpus,
                memory=stage_memory(cfg, "filter"),
                resources=res.filter_resources or None,
                batch_format="numpy",
            )
    return in_order(ds)


def in_order(ds):
    """Rows reach the trainer in the pool's slot order (:mod:`dda_ray.data.pool`), not in task
    completion order: with one train worker the same seed gives the same batches, on this engine
    and the local one, so a resumed run repeats an uninterrupted one exactly. Blocks still stream;
    a finished block only waits for the ones before it. (This dataset's own context only.)"""
    import copy

    options = copy.deepcopy(ds.context.execution_options)
    options.preserve_order = True
    ds.context.execution_options = options
    return ds


# ------------------------------------------------------------ train workers
class RayTrainEngine(Engine):
    """The Ray Train engine for :func:`dda_ray.distill.driver.drive`: rows from this worker's shard
    (:class:`~dda_ray.engines.ray_source.RaySource`), reports to Ray Train with a checkpoint (rank 0's), and
    restores Ray Train's checkpoint after a worker failure. (Set-up, resume, epochs and the final
    save are the driver's, as on the local engine.)"""

    progress = False
    resumes_run_dir = True  # a restart that finds no Ray checkpoint resumes from the run directory's state.pt

    def __init__(self, bank_s: float | None = None):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size, self.bank_s = ctx.get_world_rank(), ctx.get_world_size(), bank_s

    def device(self, cfg: Config) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device() if cfg.resources.use_gpu else torch.device("cpu")

    def wrap(self):
        import ray.train.torch

        return ray.train.torch.prepare_model if self.world_size > 1 else None

    def restored(self, load):
        """Ray Train's checkpoint after a worker failure (none: the driver reads the run directory's
        state.pt if there is one, :attr:`Engine.resumes_run_dir`)."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load(Path(d) / "state.pt")

    def kd_bar(self, cfg: Config):
        return kd_progress(cfg, self.rank)

    def source(self, run):
        cfg = run.cfg
        n = len(run.data.train)  # real_kd: the pool is data.train_subset rows of it (the stream reads them itself)
        real_rows = (n if cfg.data.train_subset is None else min(n, cfg.data.train_subset)) if cfg.run.mode == "real_kd" else None
        return RaySource(cfg, run.synthesizer, self.rank, self.world_size, run.next_round, real_rows, shard=self.shard())

    def shard(self):
        """Where this engine's rows come from: None, the worker's Ray Train dataset shard."""
        return None

    def report(self, metrics: dict, epoch: int, save_state) -> None:
        import tempfile

        import ray.train

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                save_state(Path(d) / "state.pt")
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, checkpoint=checkpoint)


def kd_progress(cfg: Config, rank: int):
    """The KD-step bar of a Ray run: rank 0 only; a plain tqdm when the loop runs in the driver
    (``resources.num_workers=0``), else Ray's ``tqdm_ray``, whose updates the driver draws (a worker's
    own carriage-return bar would reach the driver's log as one line per refresh)."""
    if rank != 0:
        return False
    if cfg.resources.num_workers == 0:
        return True
    from .. import progress

    if progress.mode() == "lines":  # the driver's output is no terminal: a few plain lines, forwarded to its log
        return lambda total, desc: progress.LineProgress(total=total, desc=desc, leave=False)
    from ray.experimental.tqdm_ray import tqdm as tqdm_ray

    return lambda total, desc: tqdm_ray(total=total, desc=desc, flush_interval_s=2.0)


def train_worker(config: dict) -> None:
    """Ray Train worker: the run driver (:func:`dda_ray.distill.driver.drive`) on the Ray Train engine."""
    from ..distill.driver import drive
    from ..runtime import mark
    from ..tracking import Tracker

    cfg = config_from_dict(config["cfg"])
    set_progress_mode(cfg.run.progress)  # the driver's, resolved: this process's stderr is never a terminal
    if not cfg.run.verbose:
        import logging

        # Ray Train configures this worker's root logger at INFO, and its "Reporting training result N:
        # TrainingReport(<every metric>)" line per epoch goes through a logger named after its file (under
        # the root, not ray.train): warnings and errors only, as everywhere else without --verbose
        for name in ("", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    engine = RayTrainEngine(config.get("bank_s"))
    mark(cfg.run_dir, "worker_start", rank=engine.rank)
    tracker = Tracker(**config["mlflow"]) if engine.rank == 0 and config.get("mlflow") else None
    drive(cfg, engine, tracker)


def uneven_data_config(execution_options=None):
    """Ray Train's DataConfig (``execution_options``: its argument, one or per dataset), but splitting with ``equal=False``: no kept row is dropped."""
    import copy
    import warnings

    from ray.train import DataConfig

    class UnevenDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ordered = ds.context.execution_options.preserve_order
                given = execution_options.get(name) if isinstance(execution_options, dict) else execution_options
                if given is None:
                    with warnings.catch_warnings():  # Ray's own defaults pass its deprecated exclude_resources
                        warnings.filterwarnings("ignore", message=r".*exclude_resources.* is deprecated")
                        given = self.default_ingest_options()
                ds.context.execution_options = copy.deepcopy(given)
                if world_size == 1:  # one worker: keep the stream's input order (same seed, same batches)
                    ds.context.execution_options.preserve_order = ordered
                for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                    output[i][name] = split
            return output

    return UnevenDataConfig(execution_options=execution_options)


# ------------------------------------------------------------------- driver
def scaling_config(cfg: Config):
    """Ray Train workers: count, GPU, and what each reserves (CPUs, a GPU, custom resources)."""
    import ray.train

    res = cfg.resources
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": 1} if res.use_gpu else {}), **res.worker_resources}
    return ray.train.ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker)


def init_ray(cfg: Config | None) -> None:
    """Attach to ``RAY_ADDRESS`` when set, else start an embedded local Ray with the dashboard; one
    line says which. Ray's own logs are quiet (warnings and errors) unless ``run.verbose``."""
    import signal

    import ray

    if ray.is_initialized():
        return
    verbose = cfg is not None and cfg.run.verbose
    # Ray's loggers in the driver and every task/actor of the job: INFO, or warnings and errors only.
    quiet = {"logging_config": ray.LoggingConfig(log_level="INFO" if verbose else "WARNING")}
    if not verbose:
        from ray.data import DataContext

        from ..runtime import quiet_ray_data_console

        DataContext.get_current().enable_progress_bars = False  # the KD bar (rank 0) shows progress
        quiet_ray_data_console()
        quiet["runtime_env"] = {
            "worker_process_setup_hook": "dda_ray.runtime.quiet_ray_data_console",
            # Ray Train sends a worker's print() through its logger too, and the job log got each epoch line twice
            "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"},
        }
    # ray.init replaces the driver's SIGTERM handler with a bare sys.exit; keep the job's own
    # (cli.run_job's: a clear message and a consistent run directory) when one is installed.
    sigterm = signal.getsignal(signal.SIGTERM)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        from .ray_compat import check_ray_address

        check_ray_address(address)  # preflight checked already; library callers get the same fast error
        ray.init(address=address, **quiet)
        print(f"attached to the Ray cluster at {address}", flush=True)
    else:
        if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
            # Ray turns token auth on for a new local cluster and, finding no token, writes one to
            # ~/.ray/auth_token (which then turns auth on for unrelated `ray start` clusters too).
            # Give it a fresh token in this process's environment instead (the embedded cluster's
            # processes inherit it): same protection, nothing left in the home directory.
            import secrets

            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        # The dashboard stays on: without it, Tune/ASHA can hang waiting for released resources.
        ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True, **quiet)
        print(f"started a local Ray (dashboard: http://{ctx.dashboard_url})" if ctx.dashboard_url else "started a local Ray", flush=True)
    if callable(sigterm) and signal.getsignal(signal.SIGTERM) is not sigterm:
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)


def run_ray(cfg: Config, tracker=None, callbacks: list | None = None) -> dict:
    """Build the initial bank, then run the streaming Ray Train distillation; returns final metrics.

    ``callbacks``: Ray Train ``UserCallback`` s for the trainer's RunConfig (a Tune trial passes
    ``ray.tune.integration.ray_train.TuneReportCallback`` so Tune sees every epoch's report).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from ..models.checkpoint import read_meta
    from ..runtime import mark
    from ..synthesis.initial_bank import run_synthesizer

    cfg = cfg.with_absolute_paths()
    # bars or lines, decided here where the user's output goes; the Train workers and trials get the answer
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress=set_progress_mode(cfg.run.progress)))
    if cfg.run.mode != "real_kd":
        # Read the data once here, before Ray starts: an unreadable data.path is a user error
        # (one line, exit 2) rather than a worker failure retried max_failures times, and the
        # decoded cache is written once instead of by every worker at the same time.
        from ..data import load_data

        load_data(cfg.data, progress=True)
        mark(cfg.run_dir, "data_checked")
    init_ray(cfg)
    # several nodes: the stages exchange files, so each must see what this node writes (stops here otherwise)
    check_shared_paths(shared_paths(cfg))
    mark(cfg.run_dir, "shared_paths_checked")
    res = cfg.resources
    run_dir = cfg.run_dir
    class_names, bank_s = None, None
    if cfg.run.mode != "real_kd":
        t0 = time.perf_counter()
        run_synthesizer(cfg)  # the initial bank, here (or in Ray tasks: resources.synthesis_tasks)
        bank_s = time.perf_counter() - t0
        class_names = (read_meta(cfg.teacher.checkpoint) or {}).get("classes")  # sd_img2img prompts
        mark(run_dir, "bank_checked")
    ds = build_dataset(cfg, class_names)
    cfg_dict = cfg.to_dict()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg_dict, "bank_s": bank_s, "mlflow": {"uri": tracker.uri, "run_id": tracker.run_id} if tracker is not None and tracker.enabled else None},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks or []),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if cfg.run.verbose else "WARNING"),
        ),
        datasets={"train": ds},
        dataset_config=uneven_data_config(),
    )
    mark(run_dir, "fit_start")
    result = trainer.fit()
    mark(run_dir, "fit_end")
    metrics_file = run_dir / "metrics.json"
    final = json.loads(metrics_file.read_text()) if metrics_file.exists() else dict(result.metrics or {})
    return final


__all__ = ["build_dataset", "init_ray", "run_ray", "train_worker"]
