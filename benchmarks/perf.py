"""How fast is the pipeline? Ratios measured side by side, in one run, on the same work (issue #7: 4, 5, 6, 8).

    RAY_AUTH_MODE=disabled python benchmarks/perf.py streaming [--repeats 3]   # (4) streaming vs augment-everything-first
    RAY_AUTH_MODE=disabled python benchmarks/perf.py streaming --partitioned [--cores 0 1]   # (4) the same, trainer and stages on one core each
    RAY_AUTH_MODE=disabled python benchmarks/perf.py step [--repeats 3]        # (5) Ray Train per step vs a plain PyTorch loop
    RAY_AUTH_MODE=disabled python benchmarks/perf.py augment [--repeats 3]     # (6) batched vs per-image diffusion; pool size 1 vs 2
    RAY_AUTH_MODE=disabled python benchmarks/perf.py memory                    # (8) peak RSS per stage
    RAY_AUTH_MODE=disabled python benchmarks/perf.py synthesis [--repeats 3]   # initial bank img/s, dda, cmi and fast, driver vs Ray tasks
    python benchmarks/perf.py kd --config configs/cifar10_cpu_bench.yaml [--repeats 5]  # the KD step vs its roofline (perf_kd.py)
    common options: [--config configs/cifar10_cpu_smoke.yaml] [--output-dir outputs/bench_perf] [--quick] [section.field=value ...]

Every benchmark starts from the smoke preset (shipped wrn16_2 teacher -> wrn16_1 student, shipped prior
``checkpoints/cifar10_prior``, CIFAR-10 JPEG copy) made small (``SMALL`` below: one torch thread per process,
no tracking, one epoch, no synthesis rounds during training) and one shared synthetic bank under
``<output-dir>/bank-*`` (made once, skipped when present). Arms alternate inside every repeat, so a
change of load on a shared machine hits all arms alike; tables give medians over the repeats and the
per-repeat values.

  streaming  ``dda_ray.engines.ray_train.run_ray`` three times per repeat on the same bank, one pass over the
             stream (``distill.steps_per_epoch=null``: every original and every kept variation once):
             as shipped (augment and filter actor pools stream into the trainer); with
             ``build_dataset`` wrapped to ``.materialize()`` the same Ray Data graph first
             (sequential: diffuse and filter everything, then train); and with
             ``resources.fused_stages=true`` (one pool of augment-then-filter actors). Each arm of
             each repeat has its own empty ``augment.cache_dir``, so diffusion is really recomputed.
             ``--partitioned``: the streaming and sequential arms only, on the ``PARTITIONED`` workload
             (augment+filter and training about equally long), with the cores split: this process (the
             trainer: Ray Train local mode runs the loop here; Ray Data's streaming executor threads run
             here too, in both arms) on core ``--cores TRAINER``, every process of the Ray session (GCS,
             raylet, read task, augment and filter actors) on core ``STAGES``: the affinity is set before
             ``ray.init`` (Ray's processes inherit it), then every thread of this process is moved to the
             trainer's core. The affinities in effect (``Cpus_allowed_list`` of every thread of every process
             of the session, sampled during the runs) are printed. An unmeasured warm-up run comes first.
             Reports sequential / streaming, the stage times (sequential arm: ``materialize()`` of the
             augment+filter graph, and the train loop), the bound max(stages) / sum(stages), and when each
             stage worked (stream logs); appended to ``benchmarks/results/perf.jsonl``
             (``streaming_over_sequential_partitioned``: streaming wall / sequential wall).
  step       per KD step: ``Distiller.train_step`` in a plain loop in this process, vs the same step
             inside ``run_ray`` (``TorchTrainer``, ``num_workers=0`` local mode and ``num_workers=1``),
             on the same batches (``run.mode=real_kd`` on ``data.train_subset`` real images: one
             in-memory block, read in order, so the Ray loop sees the plain loop's batches).
             Ray's per-step time is the median gap between the stream log's batch timestamps.
  augment    ``Augmenter.augment`` on bank images, batched (``augment.batch_size``) vs one image per
             call, in this process; then ``AugmentStage`` through ``map_batches`` with an actor pool of
             1 and 2 (fresh cache per run).
  synthesis  the initial bank (``run_synthesizer``, fresh bank per arm) for ``synthesis.method`` dda, cmi and fast,
             in this process and over Ray tasks (dda: ``--synthesis-tasks``; cmi, fast: one chain, one task);
             images/s, also appended to ``benchmarks/results/perf.jsonl`` (``synthesis_img_per_s_*``).
  kd         (``perf_kd.py``) ``Distiller.train_step`` as configured vs the bare arithmetic of the step, in this
             process, on the config's own batch and models (not ``SMALL``: only one torch thread and no
             tracking are forced); ``kd_step_over_roofline`` in ``benchmarks/results/perf.jsonl``.
  memory     one shipped-shape streaming run (``run_ray``) while a sampler reads the peak RSS
             (``VmHWM``) of every process of this Ray instance; a synthesis round and a bare import
             run in child processes (``ru_maxrss``).

Ray is started here, embedded, with ``address="local"`` (never someone else's cluster on the same machine) and
without the dashboard unless ``--dashboard`` (``init_ray`` turns it on for Tune; Train and Data do not need it,
and on a loaded 2-core machine it is slow to come up). ``run_ray`` then finds Ray initialised and uses it.

Prints one Markdown table per benchmark (machine line, date, command) and appends it to
``<output-dir>/results.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # an embedded test cluster: no token file in ~/.ray

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

BENCHMARKS = ("streaming", "step", "augment", "memory", "synthesis", "kd")
PERF_JSONL = Path(__file__).resolve().parent / "results" / "perf.jsonl"  # append-only, one line per figure
RAY_NOTE = "no Ray"

# Small enough for minutes on 2 shared cores; the same components as the presets.
SMALL = [
    "tracking.enabled=false",
    "resources.torch_threads=1",
    "synthesis.init_rounds=1",
    "synthesis.init_batch_size=32",
    "synthesis.init_g_steps=10",
    "synthesis.rounds_per_epoch=0",
    "distill.epochs=1",
    "distill.steps_per_epoch=null",
    "distill.batch_size=32",
    "data.eval_subset=100",
]
# --quick: seconds, for tests and a first look (the numbers mean little).
QUICK = [
    "synthesis.init_rounds=1",
    "synthesis.init_batch_size=8",
    "synthesis.init_g_steps=2",
    "augment.batch_size=4",
    "distill.batch_size=8",
    "data.eval_subset=50",
]


# ---------------------------------------------------------------- helpers
def machine_line() -> str:
    import ray
    import torch

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    from dda_ray.runtime import cpu_description

    return f"{platform.platform()}, {os.cpu_count()} CPUs ({cpu_description()}), python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}; load average (1/5/15 min) at start {load}"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def fmt_list(xs: list[float], nd: int = 1) -> str:
    return ", ".join(fmt(x, nd) for x in xs)


class Report:
    """Collects one benchmark's Markdown and prints / appends it at the end."""

    def __init__(self, args, title: str):
        self.args, self.lines = args, [f"### {title}", ""]
        self.lines += [f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}", f"- machine: {machine_line()}", f"- command: `{command_line()}`", ""]

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "---|" * len(header))
        self.lines += ["| " + " | ".join(r) + " |" for r in rows]
        self.lines.append("")

    def emit(self) -> str:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        self.lines.append(f"- load average at end: {load}; {RAY_NOTE}")
        text = "\n".join(self.lines) + "\n"
        print("\n" + text, flush=True)
        out = Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.md", "a") as f:
            f.write(text + "\n")
        return text


def record(metric: str, value: float, unit: str, detail: dict, path: Path | None = None) -> dict:
    """Append one measured figure to ``benchmarks/results/perf.jsonl`` (or ``path``): metric, value, unit,
    detail, commit, date, load = the 1-minute load average when it was taken; the CPU in ``detail``."""
    from dda_ray.runtime import cpu_description

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=PERF_JSONL.parents[2], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    detail = {**detail, "cpu": cpu_description()}  # another instruction set, other kernels: other timings
    line = {"metric": metric, "value": value, "unit": unit, "detail": detail, "commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load": round(os.getloadavg()[0], 2)}
    path = Path(path) if path is not None else PERF_JSONL
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


def command_line() -> str:
    return "python benchmarks/perf.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def make_cfg(args, *extra: str):
    from dda_ray.config import load_config

    quick = QUICK if args.quick else []
    workload = PARTITIONED if getattr(args, "partitioned", False) else []
    base = [*SMALL, *workload, *quick, *args.overrides]  # --quick shrinks the partitioned workload too
    probe = load_config(args.config, base)
    s = probe.synthesis
    bank = Path(args.output_dir).resolve() / f"bank-r{s.init_rounds}x{s.init_batch_size}-g{s.init_g_steps}-s{probe.run.seed}"
    return load_config(args.config, [*base, f"run.output_dir={Path(args.output_dir).resolve()}", f"synthesis.bank_dir={bank}", *extra])


def fresh(cfg_overrides_fn, args, tag: str, *extra: str):
    """A config with its own run directory and augment cache (nothing shared with other arms)."""
    name = f"{time.strftime('%H%M%S')}-{tag}-{os.getpid()}"
    cache = Path(args.output_dir).resolve() / "caches" / name
    return cfg_overrides_fn(args, f"run.name={name}", f"augment.cache_dir={cache}", *extra), cache


def start_ray(args) -> None:
    """Our own local Ray (never someone else's cluster on this machine); dashboard only with --dashboard."""
    import ray
    from ray.data import DataContext

    if ray.is_initialized():
        return
    global RAY_NOTE
    address = args.ray_address or "local"
    if address != "local":
        ray.init(address=address, log_to_driver=True)
        RAY_NOTE = f"Ray cluster at {address}"
    else:
        dashboard = args.dashboard
        # Ray starts its worker processes (actors, train workers) at niceness 15: on a machine shared with
        # other jobs they then lose the CPU to every un-niced process while the driver does not, which
        # measures the neighbours, not Ray. 0 by default here; --ray-worker-niceness 15 for Ray's default.
        os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)
        if args.partitioned:  # Ray's processes inherit the mask of the thread that starts them
            os.sched_setaffinity(0, {args.cores[1]})
        for attempt in range(3):  # the raylet's 30 s registration window can pass on an overloaded machine
            try:
                ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", num_cpus=os.cpu_count(), log_to_driver=True)
                break
            except Exception as e:
                if attempt == 2:
                    raise
                print(f"ray.init failed ({type(e).__name__}: {str(e)[:120]}); retrying without the dashboard", flush=True)
                ray.shutdown()
                dashboard = False
        RAY_NOTE = "embedded local Ray, dashboard " + ("on (as dda_ray.engines.ray_train.init_ray)" if dashboard else "off") + f", Ray worker niceness {args.ray_worker_niceness}"
        if args.partitioned:
            pin_process({args.cores[0]})  # the driver's threads (Ray's own included) onto the trainer's core
            RAY_NOTE += f"; Ray's processes on core {args.cores[1]}, this process (the trainer) on core {args.cores[0]}"
    DataContext.get_current().enable_progress_bars = False


def ensure_bank(args) -> Path:
    """The shared initial bank (``build_initial_bank``: skips rounds already on disk)."""
    from dda_ray.synthesis.initial_bank import initial_bank_dir, run_synthesizer

    cfg = make_cfg(args)
    t0 = time.perf_counter()
    run_synthesizer(cfg, device="cpu", progress=False)
    path = initial_bank_dir(cfg)
    print(f"bank {path} ready ({time.perf_counter() - t0:.1f}s)", flush=True)
    return path


def run_ray_timed(cfg, materialize: bool = False) -> dict:
    """``dda_ray.engines.ray_train.run_ray`` on ``cfg``; ``materialize``: execute the whole Ray Data graph before training."""
    from dda_ray.engines import ray_train as pipeline
    from dda_ray.runtime import prepare_run_dir

    prepare_run_dir(cfg)
    timing: dict = {}
    original = pipeline.build_dataset

    def materialized(c, class_names=None):
        t0 = time.perf_counter()
        ds = original(c, class_names).materialize()
        timing["augment_filter_s"] = time.perf_counter() - t0
        timing["materialized_rows"] = ds.count()
        return ds

    if materialize:
        pipeline.build_dataset = materialized
    try:
        t0 = time.perf_counter()
        final = pipeline.run_ray(cfg)
        timing["wall_s"] = time.perf_counter() - t0
    finally:
        pipeline.build_dataset = original
    return {**final, **timing}


def stream_log_step_s(run_dir: Path, skip: int = 2) -> list[float]:
    """Gaps between consecutive trained batches (rank 0's stream log): one KD step + the next batch's fetch."""
    files = sorted((run_dir / "stream").glob("train-rank0-epoch*.jsonl"))
    ts = [json.loads(line)["t"] for f in files for line in f.read_text().splitlines() if line.strip()]
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False)]
    return gaps[skip:]


def augment_busy(run_dir: Path) -> tuple[float, int]:
    """(first batch start -> last batch end, parents) from the augment actors' stream logs."""
    t0, t1, parents = float("inf"), 0.0, 0
    for path in (run_dir / "stream").glob("augment-*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            t0, t1, parents = min(t0, rec["t0"]), max(t1, rec["t1"]), parents + rec["parents"]
    return (t1 - t0 if parents else float("nan")), parents


# ---------------------------------------------------------------- (4) streaming vs sequential
def stream_row(arm: str, rs: list[dict], *extra: str) -> list[str]:
    """One arm's row of a streaming table: wall times, stage times, ``extra`` columns, rows and steps trained."""
    return [
        arm,
        fmt(median([x["wall_s"] for x in rs]), 1),
        fmt_list([x["wall_s"] for x in rs]),
        fmt(median([x["augment_filter_s"] for x in rs]), 1) if arm == "sequential" else "(overlapped)",
        fmt(median([x.get("train_s", float("nan")) for x in rs]), 1),
        *extra,
        "/".join(str(x.get("rows")) for x in rs),
        "/".join(str(x.get("steps")) for x in rs),
    ]


def bench_streaming(args) -> str:
    if args.partitioned:
        return bench_streaming_partitioned(args)
    start_ray(args)
    # arm -> (materialize the graph first, extra overrides)
    arms = {"streaming": (False, []), "sequential": (True, []), "fused": (False, ["resources.fused_stages=true"])}
    res: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(args.repeats):
        order = list(arms)[r % 3 :] + list(arms)[: r % 3]
        for arm in order:
            materialize, extra = arms[arm]
            cfg, cache = fresh(make_cfg, args, f"stream-{arm}-{r}", "run.mode=dda", *extra)
            out = run_ray_timed(cfg, materialize=materialize)
            shutil.rmtree(cache, ignore_errors=True)
            out["run_dir"] = str(cfg.run_dir)
            res[arm].append(out)
            print(json.dumps({"bench": "streaming", "arm": arm, "repeat": r, **{k: out.get(k) for k in ("wall_s", "augment_filter_s", "train_s", "rows", "steps", "test_acc", "materialized_rows")}}), flush=True)
    cfg = make_cfg(args)
    rep = Report(args, "(4) End-to-end: streaming vs augment-and-filter-first (sequential); two pools vs one fused pool")
    rep.add(
        f"Same bank ({cfg.synthesis.init_rounds} x {cfg.synthesis.init_batch_size} images), {cfg.augment.num_variations} variations per image "
        f"(strength {cfg.augment.strength}, {cfg.augment.steps} DDIM steps, guidance {cfg.augment.guidance}), filter {cfg.filter.threshold}, "
        f"one pass (every original and kept variation trained on once, batch {cfg.distill.batch_size}), Ray Train local mode "
        f"(num_workers={cfg.resources.num_workers}), pools of {cfg.resources.augment_actors}/{cfg.resources.filter_actors} actors, "
        f"fresh augment cache per arm and repeat; {args.repeats} repeats, arms alternate.",
        "",
    )
    rows = [stream_row(arm, res[arm]) for arm in arms]
    rep.table(["arm", "wall s (median)", "wall s per repeat", "augment+filter s", "train loop s", "rows trained", "steps"], rows)
    ratio = [s["wall_s"] / t["wall_s"] for s, t in zip(res["sequential"], res["streaming"], strict=True)]
    rep.add(f"**sequential / streaming wall time: {fmt(median(ratio))}** (per repeat: {fmt_list(ratio, 2)}; > 1 means streaming is faster).", "")
    fused = [f["wall_s"] / t["wall_s"] for f, t in zip(res["fused"], res["streaming"], strict=True)]
    rep.add(f"**fused (one augment+filter pool) / two pools wall time: {fmt(median(fused))}** (per repeat: {fmt_list(fused, 2)}; < 1 means the fused pool is faster).", "")
    return rep.emit()


# ---------------------------------------------------------------- (4) partitioned: trainer on one core, stages on the other
# The workload of `streaming --partitioned` (before the command line's overrides): augment+filter on one core and the
# KD steps on the other about equally long, and long against what cannot overlap (Ray Train set-up, actor start-up,
# evaluation: ~15-20 s). Measured through run_ray (2026-12-02, one thread per process): augment (3 UNet passes of one
# variation, with guidance) + filter ~60-67 ms of the stage core per bank image; a wrn40_2 student's KD step ~30 ms
# per row, two rows per image (the image and its kept variation); at 16 x 128 images the sequential arm's
# augment+filter took 141.7 s (15.7 s of it before the first batch) and its train loop 150.3 s. One variation per
# image: its diffusion falls on its one variation slot, spread evenly over the shuffled stream (with k > 1 all k
# are made at the parent's first variation slot, which front-loads the diffusion). The bank is made with 2
# generator steps per round: image quality does not matter here.
PARTITIONED = [
    "augment.num_variations=1",
    "augment.steps=10",  # strength 0.3: int(10 * 0.3) = 3 denoising passes
    "student.arch=wrn40_2",
    "synthesis.init_rounds=16",
    "synthesis.init_batch_size=128",
    "synthesis.init_g_steps=2",
    "run.stream_log=true",
    "resources.num_workers=0",
]


def status_field(path: str | Path, name: str) -> str:
    for line in Path(path).read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return "?"


def thread_affinities(pid: int | str = "self") -> set[str]:
    """``Cpus_allowed_list`` of every thread of ``pid`` (one entry when they all agree)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out.add(status_field(f"/proc/{pid}/task/{tid}/status", "Cpus_allowed_list"))
    return out


def pin_process(cores: set[int], pid: int | None = None) -> None:
    """Every thread of ``pid`` (this process by default) onto ``cores`` (``sched_setaffinity`` of a pid
    sets only the thread with that id; threads started later inherit their creator's mask)."""
    for tid in os.listdir(f"/proc/{pid or os.getpid()}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cores)


def ray_process_label(cmd: str) -> str:
    """``raylet``, ``gcs_server``, ``AugmentStage``, ``IDLE``, ...: what a process of the Ray session runs."""
    if cmd.startswith("ray::"):
        return cmd[5:].split()[0].split(".")[0] or "ray worker"
    words = cmd.split() or ["?"]
    if Path(words[0]).name.startswith("python"):  # python [-u ...] script.py: the script
        words = [w for w in words[1:] if not w.startswith("-")] or words
    return Path(words[0]).name


class AffinitySampler(threading.Thread):
    """Polls the CPU affinity (``Cpus_allowed_list`` of every thread) of every process under this
    one, by what it runs (the actors live only while their dataset executes, so it samples during the run)."""

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.seen: dict[str, dict] = {}  # label -> {"pids": set, "cpus": set}
        self.cpu_s: dict[int, float] = {}  # pid -> CPU seconds (user + system) when last seen

    def stage_cpu_s(self, *labels: str) -> float:
        """CPU seconds of the processes that ran ``labels`` (as of their last sample)."""
        pids = {p for label, e in self.seen.items() if any(x in label for x in labels) for p in e["pids"]}
        return sum(self.cpu_s.get(p, 0.0) for p in pids)

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.interval)

    def poll(self) -> None:
        for pid in descendants(os.getpid()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                cpus = thread_affinities(pid)
                self.cpu_s[pid] = cpu_seconds(pid)
            except OSError:
                continue
            entry = self.seen.setdefault(ray_process_label(cmd), {"pids": set(), "cpus": set()})
            entry["pids"].add(pid)
            entry["cpus"] |= cpus
        entry = self.seen.setdefault("driver (train loop, Ray Data executor)", {"pids": {os.getpid()}, "cpus": set()})
        entry["cpus"] |= thread_affinities()


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def timed_kd_steps():
    """Seconds of every ``Distiller.train_step`` in this process (Ray Train local mode runs the loop here):
    the train loop's compute, as against its waiting for the next batch."""
    from dda_ray.distill.kd import Distiller

    times: list[float] = []
    original = Distiller.train_step

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **kw)
        finally:
            times.append(time.perf_counter() - t0)

    Distiller.train_step = timed
    try:
        yield times
    finally:
        Distiller.train_step = original


def read_jsonl(paths) -> list[dict]:
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def stream_timeline(run_dir: Path, start: float | None = None) -> dict:
    """When each stage worked, from the run's stream logs (wall-clock times, seconds after the first
    augment batch started): the stages' busy seconds, first/last batch, and how much of the train loop
    ran while augmentation/filtering was still going; with ``start`` (the run's ``time.time()``), also
    how long the run took to its first augment batch (set-up, actor start-up)."""
    d = Path(run_dir) / "stream"
    aug, filt = read_jsonl(d.glob("augment-*.jsonl")), read_jsonl(d.glob("filter-*.jsonl"))
    train = sorted(r["t"] for r in read_jsonl(d.glob("train-rank0-epoch*.jsonl")))
    if not aug or not train:
        return {}
    t0 = min(r["t0"] for r in aug)
    stages_end = max(r["t1"] for r in aug + filt)
    return {
        "augment_busy_s": sum(r["t1"] - r["t0"] for r in aug),
        "filter_busy_s": sum(r["t1"] - r["t0"] for r in filt),
        "augment_batches": len(aug),
        "filter_batches": len(filt),
        "stages_end_s": stages_end - t0,
        "train_first_s": train[0] - t0,
        "train_last_s": train[-1] - t0,
        "train_batches": len(train),
        "train_batches_before_stages_end": sum(t < stages_end for t in train),
        "overlap_s": max(0.0, min(stages_end, train[-1]) - train[0]),
        **({"first_augment_s": t0 - start} if start is not None else {}),
    }


def bench_streaming_partitioned(args) -> str:
    """``streaming --partitioned``: streaming vs sequential with the trainer (this process: Ray Train local
    mode's loop, and Ray Data's executor threads) on one core and Ray (raylet, GCS, the read task, the augment
    and filter actors) on the other, one torch thread everywhere. Stage times come from the sequential arm."""
    start_ray(args)
    trainer_core, stage_core = args.cores
    # Warm-up, not measured: the first run of a session pays once for what later runs find ready (imports in
    # this process, Ray Train and Ray Data set-up, the page cache behind the actors' imports and models).
    pin_process({trainer_core})
    cfg, cache = fresh(make_cfg, args, "part-warmup", "run.mode=dda", "distill.steps_per_epoch=2")
    t0 = time.perf_counter()
    run_ray_timed(cfg)
    shutil.rmtree(cache, ignore_errors=True)
    print(f"warm-up run (2 KD steps, not measured): {time.perf_counter() - t0:.1f}s", flush=True)
    arms = {"streaming": False, "sequential": True}  # arm -> materialize the graph first
    res: dict[str, list[dict]] = {a: [] for a in arms}
    seen: dict[str, dict] = {}
    for r in range(args.repeats):
        for arm in list(arms) if r % 2 == 0 else list(arms)[::-1]:
            pin_process({trainer_core})  # every driver thread, including any Ray started since
            cfg, cache = fresh(make_cfg, args, f"part-{arm}-{r}", "run.mode=dda")
            sampler = AffinitySampler()
            sampler.start()
            cpu0, start = cpu_seconds(), time.time()
            with timed_kd_steps() as steps:
                out = run_ray_timed(cfg, materialize=arms[arm])
            out["driver_cpu_s"] = cpu_seconds() - cpu0
            out["kd_step_s"] = sum(steps)
            sampler.poll()
            out["stages_cpu_s"] = sampler.stage_cpu_s("AugmentStage", "FilterStage")
            sampler.stop.set()
            sampler.join()
            shutil.rmtree(cache, ignore_errors=True)
            for label, e in sampler.seen.items():
                s = seen.setdefault(label, {"pids": set(), "cpus": set()})
                s["pids"] |= e["pids"]
                s["cpus"] |= e["cpus"]
            out = {**out, **stream_timeline(cfg.run_dir, start), "run_dir": str(cfg.run_dir)}
            res[arm].append(out)
            keys = ("wall_s", "augment_filter_s", "train_s", "kd_step_s", "driver_cpu_s", "stages_cpu_s", "rows", "steps", "augment_busy_s", "filter_busy_s", "first_augment_s", "train_first_s", "stages_end_s", "train_last_s", "overlap_s")
            print(json.dumps({"bench": "streaming-partitioned", "arm": arm, "repeat": r, **{k: out.get(k) for k in keys}}), flush=True)

    cfg = make_cfg(args)
    seq, st = res["sequential"], res["streaming"]
    stages = median([x["augment_filter_s"] for x in seq])
    train = median([x["train_s"] for x in seq])
    bound = max(stages, train) / (stages + train)
    ratios = [s["wall_s"] / q["wall_s"] for s, q in zip(st, seq, strict=True)]
    seq_wall = median([x["wall_s"] for x in seq])
    wall_bound = (seq_wall - min(stages, train)) / seq_wall  # perfect overlap, the fixed costs unchanged
    rep = Report(args, "(4) Streaming vs sequential on partitioned cores: trainer on one core, augment + filter on the other")
    a = cfg.augment
    rep.add(
        f"Trainer (this process: Ray Train local mode, `num_workers=0`, and Ray Data's streaming executor) pinned to core "
        f"{trainer_core}; Ray's processes (GCS, raylet, the read task, the augment and filter actors) to core {stage_core} "
        f"(`sched_setaffinity` before `ray.init`, inherited; every driver thread re-pinned after); one torch thread per process. "
        f"Bank {cfg.synthesis.init_rounds} x {cfg.synthesis.init_batch_size} images, {a.num_variations} variation(s) per image "
        f"(strength {a.strength}, {a.steps} DDIM steps: {max(int(a.steps * a.strength), 1)} UNet pass(es), guidance {a.guidance}), "
        f"filter {cfg.filter.threshold}, one pass (every original and kept variation once, KD batch {cfg.distill.batch_size}), "
        f"pools of {cfg.resources.augment_actors}/{cfg.resources.filter_actors} actors, fresh augment cache per arm and repeat; "
        f"{args.repeats} repeats, arm order alternates. Stage times are the sequential arm's: augment+filter = "
        "`build_dataset(...).materialize()` (actor start-up included), train = the train loop on the materialised rows.",
        "",
    )
    def med(rs, key):
        return fmt(median([x.get(key, float("nan")) for x in rs]), 1)

    rows = []
    for arm in arms:
        rs = res[arm]
        busy = med(rs, "augment_busy_s") + " / " + med(rs, "filter_busy_s")
        rows.append(stream_row(arm, rs, med(rs, "kd_step_s"), busy, med(rs, "driver_cpu_s") + " / " + med(rs, "stages_cpu_s")))
    rep.table(["arm", "wall s (median)", "wall s per repeat", "augment+filter s", "train loop s", "of which KD steps s", "augment / filter busy s",
               "CPU s: driver / stage actors", "rows trained", "steps"], rows)  # fmt: skip
    rep.add(
        f"Stages (sequential arm, medians): augment+filter {fmt(stages, 1)} s, train {fmt(train, 1)} s (ratio {fmt(max(stages, train) / min(stages, train))}). "
        f"Theoretical best streaming/sequential = max(stages)/sum(stages) = **{fmt(bound)}**; with the rest of the run "
        f"(set-up, start-up, evaluation) unchanged, (sequential wall - min(stages)) / sequential wall = {fmt(wall_bound)}.",
        "",
        f"**streaming / sequential wall time: {fmt(median(ratios))}** (per repeat: {fmt_list(ratios, 2)}; < 1 means streaming is faster; goal <= 0.60).",
        "",
    )
    tl = [x for x in st if x.get("train_batches")]
    if tl:
        rep.add(
            "Before any row exists (run start -> first augment batch: Ray Train set-up in streaming, executor and actor start-up in both), "
            + ", ".join(f"{a}: {fmt(median([x.get('first_augment_s', float('nan')) for x in res[a]]), 1)} s" for a in arms) + ". "
            "Overlap in the streaming arm (stream logs; seconds after the first augment batch started, medians): first train batch at "
            f"{fmt(median([x['train_first_s'] for x in tl]), 1)} s, last augment/filter batch ended at {fmt(median([x['stages_end_s'] for x in tl]), 1)} s, "
            f"last train batch at {fmt(median([x['train_last_s'] for x in tl]), 1)} s; train batches taken before the stages finished: "
            + ", ".join(f"{x['train_batches_before_stages_end']}/{x['train_batches']}" for x in tl)
            + f"; overlap {fmt_list([x['overlap_s'] for x in tl])} s.",
            "",
        )
    rep.table(["process (Ray session, sampled every second)", "pids", "CPUs allowed (all threads)"],
              [[label, str(len(e["pids"])), ", ".join(sorted(e["cpus"]))] for label, e in sorted(seen.items())])  # fmt: skip
    if not args.quick:  # --quick numbers mean little: not recorded
        record("streaming_over_sequential_partitioned", median(ratios), "ratio", {
            "per_repeat": ratios, "streaming_wall_s": [x["wall_s"] for x in st], "sequential_wall_s": [x["wall_s"] for x in seq],
            "augment_filter_s": [x["augment_filter_s"] for x in seq], "train_s": [x["train_s"] for x in seq],
            "streaming_train_s": [x["train_s"] for x in st], "bound": bound, "wall_bound": wall_bound,
            "kd_step_s": {a: [x["kd_step_s"] for x in res[a]] for a in arms}, "driver_cpu_s": {a: [x["driver_cpu_s"] for x in res[a]] for a in arms},
            "stages_cpu_s": {a: [x["stages_cpu_s"] for x in res[a]] for a in arms},
            "overlap": [{k: x.get(k) for k in ("first_augment_s", "train_first_s", "stages_end_s", "train_last_s", "overlap_s")} for x in st],
            "sequential_first_augment_s": [x.get("first_augment_s") for x in seq],
            "overrides": [*PARTITIONED, *args.overrides], "cores": {"trainer": trainer_core, "stages": stage_core},
            "affinity": {label: sorted(e["cpus"]) for label, e in seen.items()}, "repeats": args.repeats,
        })  # fmt: skip
    return rep.emit()


# ---------------------------------------------------------------- (5) per-step cost
def plain_steps(cfg, n_steps: int, skip: int = 2) -> list[float]:
    """``Distiller.train_step`` over the same rows Ray reads (``real_pool``: the same subset)."""
    import torch

    from dda_ray.data import load_data
    from dda_ray.distill.kd import Distiller, rotation_every
    from dda_ray.models import build_model
    from dda_ray.models.checkpoint import load_teacher
    from dda_ray.runtime import seed_everything, set_threads

    set_threads(cfg.resources.torch_threads)
    gen = seed_everything(cfg.run.seed)
    teacher, normalize, _ = load_teacher(cfg)
    data = load_data(cfg.data, progress=False).train.subset(cfg.data.train_subset, cfg.run.seed)
    student = build_model(cfg.student.arch, cfg.data.num_classes)
    # the rotation cadence the run's driver gives it (real_kd: never), as in the Ray arms
    distiller = Distiller(student, teacher, normalize, cfg.data.num_classes, cfg.distill, cfg.synthesis.rotation_lr, "cpu",
                          rotation_every=rotation_every(cfg), rotation_views=cfg.synthesis.rotation_views)  # fmt: skip
    bs = cfg.distill.batch_size
    times = []
    for s in range(n_steps):
        images = torch.from_numpy(data.images[s * bs : (s + 1) * bs].copy())
        labels = torch.from_numpy(data.labels[s * bs : (s + 1) * bs].astype("int64"))
        t0 = time.perf_counter()
        distiller.train_step(images, labels, gen)
        times.append(time.perf_counter() - t0)
    return times[skip:]


def bench_step(args) -> str:
    from dda_ray.models.checkpoint import resolved_teacher_arch

    start_ray(args)
    probe = make_cfg(args)
    n = args.steps or (6 if args.quick else 15)
    subset = n * probe.distill.batch_size
    common = ["run.mode=real_kd", f"data.train_subset={subset}", "run.stream_log=true"]
    arms = ["plain", "ray_local", "ray_worker"]
    res: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(args.repeats):
        order = arms[r % 3 :] + arms[: r % 3]
        for arm in order:
            if arm == "plain":
                cfg, _ = fresh(make_cfg, args, f"step-{arm}-{r}", *common)
                t0 = time.perf_counter()
                gaps = plain_steps(cfg, n)
                out = {"step_s": median(gaps), "mean_step_s": sum(gaps) / len(gaps), "wall_s": time.perf_counter() - t0, "steps": n}
            else:
                workers = 0 if arm == "ray_local" else 1
                cfg, _ = fresh(make_cfg, args, f"step-{arm}-{r}", *common, f"resources.num_workers={workers}")
                final = run_ray_timed(cfg)
                gaps = stream_log_step_s(cfg.run_dir)
                out = {"step_s": median(gaps), "mean_step_s": final["train_s"] / max(final["steps"], 1), "wall_s": final["wall_s"], "steps": final["steps"],
                       "data_wait_ms_per_step": 1000 * final.get("data_wait_s", float("nan")) / max(final["steps"], 1)}  # fmt: skip
            res[arm].append(out)
            print(json.dumps({"bench": "step", "arm": arm, "repeat": r, **out}), flush=True)
    rep = Report(args, "(5) Per KD step: Ray Train vs a plain PyTorch loop")
    rep.add(
        f"{probe.student.arch} student, {resolved_teacher_arch(probe)} teacher, batch {probe.distill.batch_size}, {n} steps per run on the same "
        f"{subset} real images in the same order (`run.mode=real_kd`), one torch thread; first 2 steps dropped as warm-up; "
        f"{args.repeats} repeats, arm order rotates. Step = `Distiller.train_step` (plain) or the gap between consecutive "
        "batches in the Ray worker's stream log (train step + fetching the next batch through Ray Data). "
        "'mean incl. startup' = the train loop's `train_s / steps` (includes waiting for the first batch). "
        "'run wall s' = whole run (plain: the steps only; Ray: `run_ray`, i.e. trainer start, data, steps, evaluation).",
        "",
    )
    base = median([x["step_s"] for x in res["plain"]])
    rows = []
    for arm in arms:
        rs = res[arm]
        m = median([x["step_s"] for x in rs])
        rows.append([
            {"plain": "plain loop (`Distiller.train_step`)", "ray_local": "Ray Train, num_workers=0 (local mode)", "ray_worker": "Ray Train, num_workers=1"}[arm],
            fmt(m * 1000, 0),
            fmt_list([x["step_s"] * 1000 for x in rs], 0),
            fmt(m / base, 2),
            fmt(median([x["mean_step_s"] for x in rs]) * 1000, 0),
            fmt(median([x["wall_s"] for x in rs]), 1),
        ])
    rep.table(["arm", "ms/step (median)", "per repeat", "vs plain", "mean incl. startup ms/step", "run wall s"], rows)
    ratio = {a: median([x["step_s"] for x in res[a]]) / base for a in ("ray_local", "ray_worker")}
    waits = {a: median([x["data_wait_ms_per_step"] for x in res[a]]) for a in ("ray_local", "ray_worker")}
    rep.add(f"Waiting for the next batch (the loop's `data_wait_s` / steps, after the first batch): local mode {fmt(waits['ray_local'], 1)} ms/step, "
            f"one worker {fmt(waits['ray_worker'], 1)} ms/step.", "")  # fmt: skip
    if not args.quick:
        record("ray_step_over_plain", ratio["ray_local"], "ratio", {
            "ray_worker_over_plain": ratio["ray_worker"], "plain_ms": base * 1000, "per_repeat_ms": {a: [x["step_s"] * 1000 for x in res[a]] for a in arms},
            "data_wait_ms_per_step": waits, "steps": n, "repeats": args.repeats, "batch": probe.distill.batch_size, "threads": probe.resources.torch_threads,
            "student": probe.student.arch, "teacher": resolved_teacher_arch(probe),
        })  # fmt: skip
    return rep.emit()


# ---------------------------------------------------------------- (6) augmentation throughput
def bench_augment(args) -> str:
    from dda_ray.augment.augmenter import Augmenter
    from dda_ray.data.bank import read_bank
    from dda_ray.models.checkpoint import load_teacher
    from dda_ray.runtime import set_threads
    from dda_ray.synthesis.initial_bank import initial_bank_dir

    cfg = make_cfg(args, "run.mode=dda")
    set_threads(cfg.resources.torch_threads)
    bank = read_bank(initial_bank_dir(cfg))
    n = min(args.images or (4 if args.quick else 16), len(bank.ids))
    images, labels, ids = bank.images[:n], bank.labels[:n], bank.ids[:n]
    _, _, meta = load_teacher(cfg)
    aug = Augmenter(cfg.augment, meta.get("classes"))
    aug.augment(images[:1], labels[:1], ids[:1])  # warm-up (first-call allocations)

    def batched():
        aug.augment(images, labels, ids)

    def per_image():
        for i in range(n):
            aug.augment(images[i : i + 1], labels[i : i + 1], ids[i : i + 1])

    local: dict[str, list[float]] = {"batched": [], "per_image": []}
    for r in range(args.repeats):
        for arm in (["batched", "per_image"] if r % 2 == 0 else ["per_image", "batched"]):
            t0 = time.perf_counter()
            (batched if arm == "batched" else per_image)()
            local[arm].append(n / (time.perf_counter() - t0))
            print(json.dumps({"bench": "augment", "arm": arm, "repeat": r, "img_s": local[arm][-1]}), flush=True)

    pools: dict[int, list[dict]] = {}
    if not args.no_pool:
        import ray
        from ray.data import ActorPoolStrategy

        from dda_ray.engines.pool_source import bank_pool
        from dda_ray.engines.stages import AugmentStage

        start_ray(args)
        sizes = args.pool_sizes
        for r in range(args.pool_repeats or args.repeats):
            for size in (sizes if r % 2 == 0 else sizes[::-1]):
                pcfg, cache = fresh(make_cfg, args, f"pool{size}-{r}", "run.mode=dda", f"resources.augment_actors={size}")
                pcfg = pcfg.with_absolute_paths()
                pcfg.run_dir.mkdir(parents=True, exist_ok=True)
                res = pcfg.resources
                t0 = time.perf_counter()
                ds = ray.data.from_arrow(bank_pool([str(initial_bank_dir(pcfg))])[0])  # bank rows: each is expanded to all its variations
                ds = ds.map_batches(  # as dda_ray.engines.ray_train.build_dataset maps it
                    AugmentStage,
                    fn_constructor_kwargs={"cfg_dict": pcfg.to_dict(), "class_names": meta.get("classes")},
                    compute=ActorPoolStrategy(size=size),
                    batch_size=pcfg.augment.batch_size,
                    num_cpus=res.augment_cpus,
                    batch_format="numpy",
                )
                rows = ds.materialize().count()
                wall = time.perf_counter() - t0
                busy, parents = augment_busy(pcfg.run_dir)
                shutil.rmtree(cache, ignore_errors=True)
                out = {"wall_img_s": parents / wall, "busy_img_s": parents / busy, "parents": parents, "rows": rows, "wall_s": wall}
                pools.setdefault(size, []).append(out)
                print(json.dumps({"bench": "augment", "arm": f"pool{size}", "repeat": r, **out}), flush=True)

    rep = Report(args, "(6) Augmentation throughput: batched vs one image per call; actor pool size")
    a = cfg.augment
    rep.add(
        f"`Augmenter` with `{a.model}` ({a.backend}), {a.num_variations} variations per image, strength {a.strength}, "
        f"{a.steps} DDIM steps (so {max(int(a.steps * a.strength), 1)} UNet passes), guidance {a.guidance} (cond + uncond in one "
        f"pass), one torch thread per process; images/s counts input images (x{a.num_variations} variations each). "
        f"{args.repeats} repeats, arm order alternates.",
        "",
    )
    b = median(local["batched"])
    rows = [
        [f"in-process, batched (`augment.batch_size={a.batch_size}`: {max(1, a.batch_size // a.num_variations)} images per UNet call)", str(n), fmt(b, 2), fmt_list(local["batched"], 2), "1.00"],
        ["in-process, one image per call", str(n), fmt(median(local["per_image"]), 2), fmt_list(local["per_image"], 2), fmt(median(local["per_image"]) / b, 2)],
    ]
    rep.table(["arm", "images", "images/s (median)", "per repeat", "vs batched"], rows)
    if pools:
        p1 = median([x["busy_img_s"] for x in pools[min(pools)]])
        prow = []
        for size, rs in sorted(pools.items()):
            busy = median([x["busy_img_s"] for x in rs])
            prow.append([
                f"map_batches(AugmentStage), ActorPoolStrategy(size={size}), {cfg.resources.augment_cpus} CPU/actor",
                str(rs[0]["parents"]),
                fmt(busy, 2),
                fmt_list([x["busy_img_s"] for x in rs], 2),
                fmt(busy / p1, 2),
                fmt(median([x["wall_img_s"] for x in rs]), 2),
            ])
        rep.add(f"{args.pool_repeats or args.repeats} repeats. Through Ray Data (bank Parquet -> `AugmentStage` actors, fresh cache per run). 'busy' = images / (first batch start -> last batch end) from the actors' stream logs; 'end to end' includes actor start-up (loading the pipeline) and the read.", "")
        rep.table(["pool", "images", "busy images/s (median)", "per repeat", "vs pool 1", "end-to-end images/s"], prow)
    return rep.emit()


# ---------------------------------------------------------------- (8) peak memory
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(p))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def vm_hwm_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


STAGE_PATTERNS = [("AugmentStage", "augment actor"), ("FilterStage", "filter actor"), ("RayTrainWorker", "train worker"), ("TrainController", "Ray Train controller"), ("ReadDDABank", "bank read task")]


class PeakSampler(threading.Thread):
    """Polls the peak RSS (VmHWM) of every process under this one, by what it runs."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.stop, self.peaks = interval, threading.Event(), {}

    def poll(self) -> None:
        for pid in descendants(os.getpid()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                hwm = vm_hwm_mb(pid)
            except (OSError, ValueError):
                continue
            label = next((name for pat, name in STAGE_PATTERNS if pat in cmd), None)
            if label is None:
                continue
            self.peaks[label] = max(self.peaks.get(label, 0.0), hwm)

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.interval)


def _child_synthesis(cfg_dict: dict, bank_dir: str) -> dict:
    """In a fresh process: load the teacher, run one initial-bank synthesis round; peak RSS."""
    from dda_ray.config import config_from_dict
    from dda_ray.models.checkpoint import load_teacher
    from dda_ray.runtime import seed_everything, set_threads
    from dda_ray.synthesis.synthesizer import Synthesizer

    cfg = config_from_dict(cfg_dict)
    set_threads(cfg.resources.torch_threads)
    seed_everything(cfg.run.seed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    teacher, normalize, _ = load_teacher(cfg)
    sc = cfg.synthesis
    t0 = time.perf_counter()
    Synthesizer(teacher, normalize, cfg.data.num_classes, sc, cfg.data.image_size, "cpu").run_round(0, 0, sc.init_batch_size, sc.init_g_steps, adv=0.0)
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "after_imports_mb": before, "seconds": time.perf_counter() - t0}


def _child_imports() -> dict:
    import ray  # noqa: F401
    import torch  # noqa: F401

    import dda_ray.engines.ray_train  # noqa: F401

    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def reap(pids: list[int], grace_s: float = 10.0) -> None:
    """After ray.shutdown: SIGTERM the Ray processes this run started that are still alive (on a loaded
    machine an actor can outlive its raylet and be re-parented to init)."""
    import signal

    deadline = time.time() + grace_s
    left = list(pids)
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = [p for p in left if Path(f"/proc/{p}").exists()]
    for p in left:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            if b"ray" in cmd:
                os.kill(p, signal.SIGTERM)
                print(f"stopped leftover Ray process {p}: {cmd[:80].replace(bytes(1), b' ').decode(errors='replace')}", flush=True)
        except (OSError, ProcessLookupError):
            pass


def in_child(fn, *a):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, a)


def bench_memory(args) -> str:
    from dda_ray.models.checkpoint import resolved_teacher_arch

    cfg0 = make_cfg(args)
    base = in_child(_child_imports)
    synth = in_child(_child_synthesis, cfg0.to_dict(), str(cfg0.synthesis.bank_dir))
    print(json.dumps({"bench": "memory", "imports": base, "synthesis": synth}), flush=True)
    start_ray(args)
    runs = []
    for workers in args.memory_workers:
        cfg, cache = fresh(make_cfg, args, f"mem-w{workers}", "run.mode=dda", f"resources.num_workers={workers}")
        sampler = PeakSampler()
        sampler.start()
        out = run_ray_timed(cfg)
        sampler.poll()
        sampler.stop.set()
        sampler.join()
        shutil.rmtree(cache, ignore_errors=True)
        runs.append((workers, dict(sampler.peaks), vm_hwm_mb(), out["wall_s"]))
        print(json.dumps({"bench": "memory", "num_workers": workers, "peaks": sampler.peaks, "driver_mb": runs[-1][2]}), flush=True)

    rep = Report(args, "(8) Peak memory (RSS) per stage")
    sc, a = cfg0.synthesis, cfg0.augment
    rep.add(
        f"Peak resident set (Linux `VmHWM` / `ru_maxrss`) of the process that runs each stage, one torch thread; "
        f"synthesis round: {sc.init_batch_size} images x {sc.init_g_steps} generator steps with {resolved_teacher_arch(cfg0)}; "
        f"pipeline: `run_ray` in dda mode over the {sc.init_rounds}x{sc.init_batch_size}-image bank (augment batch {a.batch_size}, "
        f"{a.num_variations} variations, filter batch {a.batch_size}, KD batch {cfg0.distill.batch_size}). "
        "The driver's peak is this benchmark process's (it also ran Ray's driver side and Ray Data's executor; "
        "in local mode, num_workers=0, the train loop runs in it). One run each.",
        "",
    )
    rows = [
        ["bare process: `import torch, ray, dda_ray.engines.ray_train`", fmt(base["peak_mb"], 0), "child process"],
        [f"synthesis round ({sc.init_batch_size} images, {sc.init_g_steps} steps; {synth['seconds']:.1f}s)", fmt(synth["peak_mb"], 0), "child process"],
    ]
    for workers, peaks, driver, wall in runs:
        where = f"run_ray, num_workers={workers} ({wall:.0f}s)"
        for label in ("augment actor", "filter actor", "train worker", "Ray Train controller", "bank read task"):
            if label in peaks:
                rows.append([label, fmt(peaks[label], 0), where])
        rows.append(["driver" + (" = train loop (local mode)" if workers == 0 else ""), fmt(driver, 0), where])
    rep.table(["stage / process", "peak RSS MB", "run"], rows)
    return rep.emit()


# ---------------------------------------------------------------- main
def bench_synthesis(args) -> str:
    """Initial-bank throughput (images/s) for ``synthesis.method`` dda, cmi and fast: made in this process
    (``resources.synthesis_tasks=0``) and over Ray tasks (dda: ``--synthesis-tasks`` concurrent tasks of
    ``synthesis_cpus`` 1; cmi and fast: one chain, so one task). Each arm of each repeat writes a fresh bank.
    (``synthesis_img_per_s_cmi`` lines before 2026-12-07 measured the DDA synthesizer, then named cmi.)"""
    from dda_ray.synthesis.initial_bank import run_synthesizer

    rounds = 1 if args.quick else args.synthesis_rounds
    rep = Report(args, "Synthesis throughput: initial bank, images/s")
    parallel = {"dda": args.synthesis_tasks, "cmi": 1, "fast": 1}  # chained methods: one task
    arms = [(m, t) for m in parallel for t in (0, parallel[m])]
    got: dict[tuple[str, int], list[float]] = {a: [] for a in arms}
    for r in range(args.repeats):
        for method, tasks in arms if r % 2 == 0 else arms[::-1]:
            if tasks:
                start_ray(args)
            name = f"synth-{method}-t{tasks}-{r}-{time.strftime('%H%M%S')}"
            cfg = make_cfg(args, f"run.name={name}", f"synthesis.method={method}", f"synthesis.init_rounds={rounds}",
                           *(["synthesis.cr=0.8"] if method == "cmi" else []),
                           f"resources.synthesis_tasks={tasks}", "resources.synthesis_cpus=1",
                           f"synthesis.bank_dir={Path(args.output_dir).resolve() / 'caches' / name}")  # fmt: skip
            t0 = time.perf_counter()
            run_synthesizer(cfg, device="cpu", progress=False)
            seconds = time.perf_counter() - t0
            images = rounds * cfg.synthesis.init_batch_size
            got[(method, tasks)].append(images / seconds)
            print(json.dumps({"bench": "synthesis", "method": method, "tasks": tasks, "repeat": r, "img_s": images / seconds}), flush=True)
    rows = []
    for (method, tasks), xs in got.items():
        where = "this process" if tasks == 0 else f"{tasks} Ray task(s)"
        rows.append([method, where, fmt(median(xs)), fmt_list(xs, 2)])
    rep.table(["method", "where", "img/s (median)", "per repeat"], rows)
    cfg = make_cfg(args)
    rep.add(f"{rounds} rounds x {cfg.synthesis.init_batch_size} images, {cfg.synthesis.init_g_steps} generator steps per round, "
            f"teacher {cfg.teacher.arch}, one torch thread per process; Ray task arms include their tasks' start-up.")  # fmt: skip
    detail = {"rounds": rounds, "batch": cfg.synthesis.init_batch_size, "g_steps": cfg.synthesis.init_g_steps, "teacher": cfg.teacher.arch, "repeats": args.repeats}
    for method in parallel if not args.quick else ():  # --quick numbers mean little: not recorded
        driver, tasks = got[(method, 0)], got[(method, parallel[method])]
        record(f"synthesis_img_per_s_{method}", median(driver), "img/s", {**detail, "where": "driver", "per_repeat": driver,
               "ray_tasks": parallel[method], "ray_tasks_img_per_s": median(tasks), "ray_per_repeat": tasks})  # fmt: skip
    return rep.emit()


def bench_kd(args) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import perf_kd  # beside this script

    def load_cfg(a):
        from dda_ray.config import load_config

        return load_config(a.config, ["tracking.enabled=false", "resources.torch_threads=1", *a.overrides])

    return perf_kd.bench_kd(args, Report, record, load_cfg, median, fmt, fmt_list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=[*BENCHMARKS, "all"])
    p.add_argument("--config", default="configs/cifar10_cpu_smoke.yaml")
    p.add_argument("--output-dir", default="outputs/bench_perf")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests, numbers mean little)")
    p.add_argument("--steps", type=int, default=None, help="step: KD steps per run (default 15; quick 6); kd: steps per arm and repeat (default 24; quick 4)")
    p.add_argument("--images", type=int, default=None, help="augment: bank images per in-process run (default 16; quick 4)")
    p.add_argument("--pool-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pool-repeats", type=int, default=None, help="augment: repeats of the actor-pool part (default: --repeats)")
    p.add_argument("--no-pool", action="store_true", help="augment: skip the Ray actor-pool part")
    p.add_argument("--synthesis-rounds", type=int, default=4, help="synthesis: initial-bank rounds per arm (quick: 1)")
    p.add_argument("--synthesis-tasks", type=int, default=2, help="synthesis: concurrent Ray tasks of the cmi Ray arm")
    p.add_argument("--memory-workers", type=int, nargs="+", default=[0, 1], help="memory: run_ray with these num_workers")
    p.add_argument("--dashboard", action="store_true", help="start the embedded Ray with its dashboard, as init_ray does (slow to start, and flaky, on a loaded 2-core machine; Train and Data do not need it)")
    p.add_argument("--ray-worker-niceness", type=int, default=0, help="nice level of Ray's worker processes (Ray's own default: 15)")
    p.add_argument("--ray-address", default=None, help="attach to this cluster instead of starting a local one")
    p.add_argument("--partitioned", action="store_true", help="streaming: the trainer (this process) on one core, Ray's processes (augment and filter actors) on another, on the PARTITIONED workload; streaming and sequential arms only")
    p.add_argument("--cores", type=int, nargs=2, default=[0, 1], metavar=("TRAINER", "STAGES"), help="--partitioned: the trainer's core and the stages' core")
    p.add_argument("overrides", nargs="*", help="section.field=value (applied after the small-budget defaults)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.partitioned:
        allowed = os.sched_getaffinity(0)
        if args.benchmark != "streaming" or args.ray_address:
            raise SystemExit("--partitioned: streaming with the embedded local Ray only")
        if args.cores[0] == args.cores[1] or not set(args.cores) <= allowed:
            raise SystemExit(f"--cores: two different cores of this process's {sorted(allowed)}")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    todo = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    if set(todo) - {"kd"}:
        ensure_bank(args)
    try:
        for name in todo:
            {"streaming": bench_streaming, "step": bench_step, "augment": bench_augment, "memory": bench_memory, "synthesis": bench_synthesis, "kd": bench_kd}[name](args)
    finally:
        import ray

        if ray.is_initialized():
            ours = descendants(os.getpid())
            ray.shutdown()
            reap(ours)
        with contextlib.suppress(Exception):
            shutil.rmtree(Path(args.output_dir).resolve() / "caches", ignore_errors=True)


if __name__ == "__main__":
    main()
