"""benchmarks/perf.py: its parser, configs, and the measurement helpers (no Ray, a few seconds)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def perf():
    spec = importlib.util.spec_from_file_location("bench_perf", ROOT / "benchmarks" / "perf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parser_subcommands_and_overrides(perf):
    p = perf.build_parser()
    for name in (*perf.BENCHMARKS, "all"):
        assert p.parse_intermixed_args([name]).benchmark == name
    args = p.parse_intermixed_args(["step", "--repeats", "5", "--quick", "distill.batch_size=16"])
    assert (args.repeats, args.quick, args.overrides) == (5, True, ["distill.batch_size=16"])
    assert p.parse_intermixed_args(["augment"]).pool_sizes == [1, 2]
    with pytest.raises(SystemExit):
        p.parse_intermixed_args(["nonsense"])


def test_configs_are_small_and_the_bank_is_keyed_by_its_settings(perf, tmp_path):
    p = perf.build_parser()
    small = perf.make_cfg(p.parse_intermixed_args(["streaming", "--config", str(ROOT / "configs/cifar10_cpu_smoke.yaml"), "--output-dir", str(tmp_path)]))
    quick = perf.make_cfg(p.parse_intermixed_args(["streaming", "--quick", "--config", str(ROOT / "configs/cifar10_cpu_smoke.yaml"), "--output-dir", str(tmp_path), "distill.batch_size=4"]))
    assert small.resources.torch_threads == 1 and not small.tracking.enabled
    assert small.distill.epochs == 1 and small.distill.steps_per_epoch is None and small.synthesis.rounds_per_epoch == 0
    assert quick.distill.batch_size == 4  # command-line overrides win over --quick
    assert quick.synthesis.init_batch_size < small.synthesis.init_batch_size
    assert small.synthesis.bank_dir != quick.synthesis.bank_dir  # a bank made with other settings is never reused
    assert Path(small.synthesis.bank_dir).parent == tmp_path.resolve()


def test_step_gaps_from_the_stream_log(perf, tmp_path):
    d = tmp_path / "stream"
    d.mkdir()
    ts = [100.0, 101.0, 101.5, 102.0, 102.5, 103.0]
    (d / "train-rank0-epoch0.jsonl").write_text("".join(json.dumps({"t": t, "rows": 8}) + "\n" for t in ts))
    assert perf.stream_log_step_s(tmp_path, skip=2) == pytest.approx([0.5, 0.5, 0.5])
    (d / "augment-1.jsonl").write_text(json.dumps({"t0": 10.0, "t1": 12.0, "parents": 4}) + "\n")
    (d / "augment-2.jsonl").write_text(json.dumps({"t0": 11.0, "t1": 14.0, "parents": 4}) + "\n")
    assert perf.augment_busy(tmp_path) == (pytest.approx(4.0), 8)


def test_report_writes_a_markdown_table(perf, tmp_path):
    args = perf.build_parser().parse_intermixed_args(["step", "--output-dir", str(tmp_path)])
    rep = perf.Report(args, "title")
    rep.table(["arm", "ms"], [["plain", "10"], ["ray", "12"]])
    text = rep.emit()
    assert "| arm | ms |\n|---|---|\n| plain | 10 |\n| ray | 12 |" in text
    assert "torch" in text and "CPUs" in text and "command: `python benchmarks/perf.py" in text
    assert (tmp_path / "results.md").read_text().strip() == text.strip()


def test_peak_sampler_finds_a_stage_process_under_this_one(perf):
    # A child whose command line names a stage, as a Ray actor's process title does.
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)", "AugmentStage"])
    try:
        sampler = perf.PeakSampler()
        deadline = time.time() + 10
        while time.time() < deadline and sampler.peaks.get("augment actor", 0) < 64:
            time.sleep(0.2)
            sampler.poll()
        assert child.pid in perf.descendants(perf.os.getpid())
        assert sampler.peaks["augment actor"] >= 64  # MB: the 64 MiB buffer is resident
    finally:
        child.kill()
        child.wait()


def test_a_recorded_figure_is_one_json_line_with_its_provenance(perf, tmp_path, monkeypatch):
    monkeypatch.setattr(perf, "PERF_JSONL", tmp_path / "results" / "perf.jsonl")
    perf.record("synthesis_img_per_s_cmi", 12.5, "img/s", {"rounds": 4})
    perf.record("synthesis_img_per_s_fast", 9.0, "img/s", {"rounds": 4})
    lines = [json.loads(x) for x in (tmp_path / "results" / "perf.jsonl").read_text().splitlines()]
    assert [x["metric"] for x in lines] == ["synthesis_img_per_s_cmi", "synthesis_img_per_s_fast"]
    assert set(lines[0]) == {"metric", "value", "unit", "detail", "commit", "date", "load"}
    assert "torch CPU capability" in lines[0]["detail"]["cpu"]  # the machine beside the figure
    assert lines[0]["value"] == 12.5 and lines[0]["detail"]["rounds"] == 4 and lines[0]["commit"] not in ("", None)


def test_kd_roofline_benchmark_runs_every_arm_and_reports_the_ratio(perf, tmp_path, monkeypatch):
    monkeypatch.setattr(perf, "PERF_JSONL", tmp_path / "perf.jsonl")
    perf.main(["kd", "--quick", "--repeats", "1", "--config", str(ROOT / "configs/cifar10_cpu_smoke.yaml"), "--output-dir", str(tmp_path), "distill.batch_size=8", "run.mode=inversion"])
    text = (tmp_path / "results.md").read_text()
    for arm in ("roofline, NCHW", "roofline, channels_last", "project step (as configured)", "project step, channels_last=true"):
        assert f"| {arm} |" in text
    assert "**roofline / project step:" in text and "rotation head every" in text
    assert not (tmp_path / "perf.jsonl").exists()  # --quick figures are not recorded


def test_partitioned_streaming_options_and_workload(perf, tmp_path):
    p = perf.build_parser()
    smoke = str(ROOT / "configs/cifar10_cpu_smoke.yaml")
    args = p.parse_intermixed_args(["streaming", "--partitioned", "--config", smoke, "--output-dir", str(tmp_path), "synthesis.init_rounds=2"])
    assert args.partitioned and args.cores == [0, 1]
    assert p.parse_intermixed_args(["streaming", "--partitioned", "--cores", "1", "0"]).cores == [1, 0]
    cfg = perf.make_cfg(args)
    assert cfg.augment.num_variations == 1 and cfg.resources.num_workers == 0 and cfg.run.stream_log
    assert cfg.synthesis.init_rounds == 2  # command-line overrides win over the workload
    plain = perf.make_cfg(p.parse_intermixed_args(["streaming", "--config", smoke, "--output-dir", str(tmp_path)]))
    assert plain.augment.num_variations == 2 and plain.synthesis.bank_dir != cfg.synthesis.bank_dir
    for bad in (["step", "--partitioned"], ["streaming", "--partitioned", "--cores", "0", "0"]):
        with pytest.raises(SystemExit):
            perf.main([*bad, "--output-dir", str(tmp_path)])  # refused before any bank is made


def test_stream_timeline_measures_the_overlap_of_stages_and_training(perf, tmp_path):
    d = tmp_path / "stream"
    d.mkdir()
    (d / "augment-1.jsonl").write_text("".join(json.dumps({"t0": t, "t1": t + 1.0, "parents": 4}) + "\n" for t in (100.0, 101.0, 102.0)))
    (d / "filter-2.jsonl").write_text("".join(json.dumps({"t0": t + 1.0, "t1": t + 1.5, "variations": 4}) + "\n" for t in (100.0, 101.0, 102.0)))
    (d / "train-rank0-epoch0.jsonl").write_text("".join(json.dumps({"t": t}) + "\n" for t in (102.0, 103.0, 104.0, 105.0)))
    tl = perf.stream_timeline(tmp_path)
    assert tl["augment_busy_s"] == pytest.approx(3.0) and tl["filter_busy_s"] == pytest.approx(1.5)
    assert (tl["train_first_s"], tl["stages_end_s"], tl["train_last_s"]) == pytest.approx((2.0, 3.5, 5.0))
    assert tl["train_batches_before_stages_end"] == 2 and tl["overlap_s"] == pytest.approx(1.5)
    assert "first_augment_s" not in tl and perf.stream_timeline(tmp_path, start=97.5)["first_augment_s"] == pytest.approx(2.5)
    assert perf.stream_timeline(tmp_path / "nothing") == {}


def test_process_labels_affinity_and_cpu_time(perf):
    assert perf.ray_process_label("ray::MapWorker(MapBatches(AugmentStage)).submit") == "MapWorker(MapBatches(AugmentStage))"
    assert perf.ray_process_label("/venv/bin/python -u /venv/ray/_private/log_monitor.py --logs-dir=/tmp") == "log_monitor.py"
    assert perf.ray_process_label("/venv/ray/core/src/ray/raylet/raylet --node-ip=1") == "raylet"
    allowed = perf.os.sched_getaffinity(0)
    perf.pin_process(allowed)  # every thread of this process, onto the cores it already has
    cpus = perf.thread_affinities()
    assert len(cpus) == 1 and cpus.pop() == perf.status_field("/proc/self/status", "Cpus_allowed_list")
    assert perf.cpu_seconds() > 0


def test_the_warm_cold_breakdown_adds_up_to_the_trial_wall(tmp_path):
    """benchmarks/tune_warm_cold.py: the critical-path rows from a trial's timeline and metrics sum to the trial
    function's wall; absent events (a trial that trains in its own process: no Ray Train) are '-'."""
    from dda_ray.runtime import append_jsonl

    spec = importlib.util.spec_from_file_location("bench_tune_warm_cold", ROOT / "benchmarks" / "tune_warm_cold.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    trial, search = tmp_path / "s-t1", tmp_path / "s"
    trial.mkdir()
    search.mkdir()
    t = 1000.0
    events = [("trial_start", 0.5, {"entered": t}), ("tracker_started", 1.0, {}), ("teacher_loaded", 2.0, {}), ("data_loaded", 3.0, {}),
              ("source_ready", 4.0, {}), ("augment_init", 6.0, {}), ("augment_ready", 6.5, {}), ("epoch_reported", 14.0, {"epoch": 1}),
              ("epoch_reported", 24.0, {"epoch": 2}), ("final_saved", 24.5, {}), ("trial_end", 26.0, {})]  # fmt: skip
    for event, dt, extra in events:
        append_jsonl(trial / "timeline.jsonl", {"event": event, "t": t + dt, "pid": 7, **extra})
    for event, dt in [("tuner_fit_start", -3.0), ("tuner_fit_end", 26.5)]:
        append_jsonl(search / "timeline.jsonl", {"event": event, "t": t + dt, "pid": 1})
    for e in (1, 2):
        append_jsonl(trial / "metrics.jsonl", {"epoch": e, "prepare_s": 0.5, "train_s": 8.0, "first_batch_s": 2.0, "eval_s": 1.0})
    rows = mod.breakdown(trial, search)
    wall = rows["trial function wall (sum of the above)"]
    assert wall == pytest.approx(26.0)
    path = list(rows)[: list(rows).index("trial function wall (sum of the above)")]
    assert sum(rows[k] for k in path if rows[k] is not None) == pytest.approx(wall)
    assert rows["Ray Train controller + worker start-up (ray_train)"] is None
    assert rows["epochs: KD steps (incl. waits on the stream)"] == pytest.approx(12.0)
    assert rows["epochs: report, checkpoint"] == pytest.approx(20.0 - 1.0 - 4.0 - 12.0 - 2.0)
    assert rows["Tune: tuner.fit() -> trial function entered"] == pytest.approx(3.0)
    assert rows["augment actors: constructor"] == pytest.approx(0.5) and rows["augment actors: constructor (count)"] == 1
