"""benchmarks/accuracy.py (resume, append-only results) and benchmarks/report.py (statistics, plot).

No Ray and no training: distill and the bank builder are replaced by fakes; a few seconds.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESET = "configs/cifar10_cpu_smoke.yaml"


def _load(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / filename)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report():
    return _load("bench_report", "report.py")


@pytest.fixture()
def accuracy():
    return _load("bench_accuracy", "accuracy.py")  # fresh per test: the tests patch its globals


def _line(arm, seed, top1, preset="p.yaml", epochs=None, **extra) -> str:
    row = {"arm": arm, "seed": seed, "preset": preset, "overrides": [], "top1": top1, "epochs": epochs or [top1 / 2, top1], **extra}
    return json.dumps(row) + "\n"


@pytest.fixture()
def results(tmp_path) -> Path:
    path = tmp_path / "accuracy.jsonl"
    path.write_text(
        _line("real_kd", 0, 80.0)
        + _line("inv", 0, 25.0)
        + "\n"
        + _line("dda", 0, 28.0)
        + _line("real_kd", 1, 82.0)
        + _line("inv", 1, 99.0)  # replaced by the rerun below
        + _line("dda", 1, 31.0)
        + _line("real_kd", 2, 84.0)
        + _line("inv", 2, 26.0)
        + _line("dda", 2, 27.0)
        + _line("inv", 1, 27.0, epochs=[20.0, 27.0])  # rerun of inv seed 1: the latest line counts
        + "   \n"
        + _line("dda", 5, 50.0, preset="other.yaml")
    )
    return path


def test_t_quantiles(report):
    assert report.t_quantile(1) == 12.706
    assert report.t_quantile(2) == 4.303
    assert report.t_quantile(30) == 2.042
    # beyond the table, Student's t itself (scipy: 2.0395, 2.0227, 1.9799, 1.9623), not the normal 1.96
    assert [report.t_quantile(df) for df in (31, 39, 120, 1000)] == [2.040, 2.023, 1.980, 1.962]
    with pytest.raises(ValueError):
        report.t_quantile(0)


def test_summary_and_paired_differences_by_hand(report, results):
    preset, rows = report.choose_preset(report.read_rows(results))
    assert preset == "p.yaml" and len(rows) == 10  # blank lines skipped, the other preset left out
    summary = {s["arm"]: s for s in report.summarize(rows)}
    assert list(summary) == ["real_kd", "inv", "dda"]

    assert summary["real_kd"]["n"] == 3 and summary["real_kd"]["seeds"] == [0, 1, 2]
    assert summary["real_kd"]["mean"] == pytest.approx(82.0)
    assert summary["real_kd"]["std"] == pytest.approx(math.sqrt((4 + 0 + 4) / 2))  # = 2
    assert summary["inv"]["mean"] == pytest.approx((25 + 27 + 26) / 3)
    assert summary["inv"]["std"] == pytest.approx(1.0)  # deviations -1, 1, 0
    assert (summary["inv"]["min"], summary["inv"]["max"]) == (25.0, 27.0)
    assert summary["dda"]["ratio_real_kd"] == pytest.approx((28 + 31 + 27) / 3 / 82)
    assert summary["real_kd"]["ratio_real_kd"] == pytest.approx(1.0)

    p = report.paired(rows, "dda", "inv")
    diffs = [28 - 25, 31 - 27, 27 - 26]  # 3, 4, 1
    m = sum(diffs) / 3
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / 2)
    half = 4.303 * sd / math.sqrt(3)
    assert p["n"] == 3 and p["seeds"] == [0, 1, 2]
    assert p["mean"] == pytest.approx(8 / 3)
    assert p["std"] == pytest.approx(sd)
    assert (p["low"], p["high"]) == (pytest.approx(m - half), pytest.approx(m + half))


def test_paired_with_fewer_than_two_shared_seeds(report):
    rows = [json.loads(_line("a", 0, 10.0)), json.loads(_line("a", 1, 12.0)), json.loads(_line("b", 1, 9.0))]
    p = report.paired(rows, "a", "b")
    assert (p["n"], p["mean"], p["std"], p["low"], p["high"]) == (1, 3.0, None, None, None)
    assert "n/a" in report.paired_table([p])
    none = report.paired(rows, "a", "missing")
    assert none["n"] == 0 and none["mean"] is None
    assert report.summarize(rows)[1]["std"] is None  # b: one seed


def test_latest_line_wins_for_reruns(report, results, capsys):
    _, rows = report.choose_preset(report.read_rows(results), "p.yaml")
    kept, repeated = report.latest_per_seed(rows)
    assert repeated == {("inv", 1): 2}
    inv1 = [r for r in kept if (r["arm"], r["seed"]) == ("inv", 1)]
    assert len(inv1) == 1 and inv1[0]["top1"] == 27.0
    assert [r["arm"] for r in kept][:3] == ["real_kd", "inv", "dda"]  # first-seen order kept
    report.main(["--results", str(results)])
    out = capsys.readouterr().out
    assert "preset p.yaml" in out and "the preset with the most lines" in out
    assert "inv seed 1 has 2 lines; the latest one counts" in out
    assert "| inv | 3 | 26.00 | 1.00 | 25.00 | 27.00 | 0 1 2 |" in out
    pairs = [line.split(" | ")[0] for line in out.splitlines() if " - " in line and line.startswith("| ") and "A - B" not in line]
    assert pairs == ["| real_kd - inv", "| real_kd - dda", "| inv - dda"]  # default: every pair, first-seen order
    assert "| inv - dda | 3 | -2.67 | 1.53 | [-6.46, 1.13] | 0 1 2 |" in out
    report.main(["--results", str(results), "--preset", "p.yaml", "--pair", "dda", "inv"])
    out = capsys.readouterr().out
    assert "| dda - inv | 3 | +2.67 |" in out and "real_kd - " not in out
    with pytest.raises(SystemExit):
        report.main(["--results", str(results), "--pair", "dda", "nope"])


def test_plot_writes_a_png(report, results, tmp_path):
    _, rows = report.choose_preset(report.read_rows(results), "p.yaml")
    bands = report.epoch_bands(rows)
    assert bands["inv"]["n"] == 3 and bands["inv"]["epoch"] == [1, 2]
    assert bands["inv"]["min"][0] == 12.5 and bands["inv"]["max"][0] == 20.0  # the rerun's curve, not 99's
    png = report.plot(rows, tmp_path / "plots" / "acc.png", title="p.yaml")
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthesis_method_defaults_to_dda(accuracy):
    assert accuracy.synthesis_method(SimpleNamespace(synthesis=SimpleNamespace())) == "dda"
    assert accuracy.synthesis_method(SimpleNamespace(synthesis=SimpleNamespace(method="fast"))) == "fast"
    assert set(accuracy.ARMS) >= {"real_kd", "synth_dda", "synth_cmi", "synth_fast", "dda_self", "dda_nofilter"}


def test_resume_skips_done_arms_and_only_appends(accuracy, tmp_path, monkeypatch):
    # Fake arms that need no synthesis.method field; adv=0 stands for a second synthesis method.
    monkeypatch.setattr(accuracy, "ARMS", {"real_kd": ["run.mode=real_kd"], "inv": ["run.mode=inversion"], "inv_other": ["run.mode=inversion", "synthesis.adv=0"], "dda_nf": ["run.mode=dda", "filter.threshold=-1"]})
    monkeypatch.setattr(accuracy, "synthesis_method", lambda cfg: "other" if cfg.synthesis.adv == 0 else "cmi")
    banks, runs = [], []

    def fake_bank(cfg):
        banks.append((cfg.run.seed, cfg.run.mode, Path(cfg.synthesis.bank_dir).name))
        return 1.5

    def fake_distill(cfg):
        runs.append((cfg.run.mode, cfg.run.seed, cfg.synthesis.bank_dir))
        acc = 10.0 + cfg.run.seed + len(runs)
        (cfg.run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "test_acc": acc - 2 + e, "train_s": 1.0}) + "\n" for e in (1, 2)))
        return {"test_acc": acc}

    monkeypatch.setattr(accuracy, "build_bank", fake_bank)
    monkeypatch.setattr(accuracy, "distill", fake_distill)
    monkeypatch.chdir(ROOT)
    out_dir, res = tmp_path / "out", tmp_path / "results" / "accuracy.jsonl"
    res.parent.mkdir()
    before = json.dumps({"arm": "old", "seed": 0, "preset": "x.yaml", "overrides": [], "top1": 1.0}).encode()  # no final newline
    res.write_bytes(before)
    argv = ["accuracy.py", "--config", PRESET, "--seeds", "0", "1", "--output-dir", str(out_dir), "--results", str(res), "tracking.enabled=false"]

    monkeypatch.setattr(sys, "argv", argv)
    accuracy.main()
    first = res.read_bytes()
    assert first.startswith(before)
    lines = [json.loads(x) for x in first.decode().splitlines()]
    assert len(lines) == 1 + 4 * 2  # one line per (arm, seed)
    new = lines[1:]
    assert [(r["arm"], r["seed"]) for r in new] == [(a, s) for s in (0, 1) for a in ("real_kd", "inv", "inv_other", "dda_nf")]
    # one bank per (seed, method), built before the first arm that needs it; real_kd gets none
    assert banks == [(0, "inversion", "bank-seed0-cmi"), (0, "inversion", "bank-seed0-other"), (1, "inversion", "bank-seed1-cmi"), (1, "inversion", "bank-seed1-other")]
    assert runs[0] == ("real_kd", 0, None)
    assert Path(runs[1][2]) == (out_dir / "bank-seed0-cmi").resolve() and Path(runs[3][2]) == (out_dir / "bank-seed0-cmi").resolve()
    row = new[1]
    assert row["preset"] == PRESET and row["overrides"] == ["tracking.enabled=false"]
    assert row["top1"] == 12.0 and row["epochs"] == [11.0, 12.0]
    assert row["bank_s"] == 1.5 and row["train_s"] == 2.0 and new[0]["bank_s"] is None
    assert row["wall_s"] >= 0 and len(row["load"]["start"]) == len(row["load"]["end"]) == 3
    assert "torch CPU capability" in row["cpu"] and row["versions"]["torch"].startswith("2.")
    assert row["commit"] and datetime.datetime.fromisoformat(row["date"]).tzinfo is not None
    assert Path(row["run_dir"]).parent == out_dir.resolve()

    banks.clear()
    runs.clear()
    accuracy.main()  # same arguments: everything is done already
    assert res.read_bytes() == first and not banks and not runs

    monkeypatch.setattr(sys, "argv", [*argv[:3], "--seeds", "1", "--arms", "dda_nf", "--rerun", *argv[6:]])
    accuracy.main()
    again = res.read_bytes()
    assert again.startswith(first) and len(again.decode().splitlines()) == len(lines) + 1
    assert json.loads(again.decode().splitlines()[-1])["arm"] == "dda_nf" and banks == [(1, "inversion", "bank-seed1-cmi")]

    monkeypatch.setattr(sys, "argv", [*argv[:-1], "tracking.enabled=false", "distill.epochs=1"])
    runs.clear()
    accuracy.main()  # other overrides: another experiment, nothing skipped
    assert len(runs) == 8 and len(res.read_bytes().decode().splitlines()) == len(lines) + 1 + 8


def test_since_keeps_the_runs_of_a_given_code_and_arms_picks_and_orders(report, tmp_path, capsys):
    """--since: only lines dated at or after it (an arm rerun on fixed code, its older lines left out
    even where the new code has no line for that seed); --arms: these arms, in this order."""
    path = tmp_path / "acc.jsonl"
    path.write_text(
        _line("real_kd", 0, 80.0, date="2026-12-01T04:00:00+00:00")
        + _line("real_kd", 1, 81.0, date="2026-12-01T04:10:00+00:00")
        + _line("inv", 0, 20.0, date="2026-12-01T04:20:00+00:00")
        + _line("real_kd", 0, 70.0, date="2026-12-07T05:00:00+00:00")
        + _line("inv", 0, 30.0, date="2026-12-07T06:00:00+00:00")
        + _line("inv", 1, 32.0, date="2026-12-07T06:30:00+00:00")
    )
    report.main(["--results", str(path), "--since", "2026-12-07T04:00", "--arms", "inv", "real_kd"])
    out = capsys.readouterr().out
    assert "| inv | 2 | 31.00 |" in out and "| real_kd | 1 | 70.00 |" in out  # real_kd seed 1 (old code) left out
    assert out.index("| inv |") < out.index("| real_kd |")
    assert "| inv - real_kd | 1 | -40.00 |" in out
