"""The shared job command line: --config plus overrides, one-line user errors."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from dda_ray.config import Config, config_from_dict, load_config
from dda_ray.jobs.cli import parse_args, run_job


def _never_called(cfg):
    raise AssertionError("the job ran despite a bad configuration")


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip()]


def test_parse_args_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  epochs: 9\n  lr: 0.2\n")
    cfg, args = parse_args(["--config", str(path), "distill.epochs=3", "augment.strength=0.5"])
    assert isinstance(cfg, Config)
    assert args.config == str(path)
    assert args.overrides == ["distill.epochs=3", "augment.strength=0.5"]
    assert cfg.distill.epochs == 3 and cfg.distill.lr == 0.2 and cfg.augment.strength == 0.5


def test_parse_args_defaults():
    cfg, args = parse_args([])
    assert args.config is None and args.overrides == []
    assert cfg == Config()


@pytest.mark.parametrize(
    "override, field",
    [
        ("distill.epochs=-1", "distill.epochs"),
        ("augment.strength=1.5", "augment.strength"),
        ("distill.nope=1", "distill.nope"),
        ("augment.strength=abc", "augment.strength"),
    ],
)
def test_bad_override_exits_2_with_one_error_line(capsys, tmp_path, override, field):
    with pytest.raises(SystemExit) as exc:
        run_job(_never_called, argv=[f"run.output_dir={tmp_path}", override])
    assert exc.value.code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and field in lines[0]
    assert "Traceback" not in lines[0]
    assert not list(tmp_path.iterdir()), "a run directory was created for a rejected config"


def test_missing_config_file_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run_job(_never_called, argv=["--config", str(tmp_path / "nope.yaml")])
    assert exc.value.code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.yaml" in lines[0]


def test_run_job_prepares_the_run_dir_and_returns_the_result(tmp_path):
    seen = {}

    def job(cfg):
        seen["cfg"] = cfg
        return {"ok": cfg.distill.epochs}

    result = run_job(job, argv=[f"run.output_dir={tmp_path}", "run.name=cli", "distill.epochs=2"])
    assert result == {"ok": 2}
    assert seen["cfg"].run_dir == tmp_path / "cli"
    assert (tmp_path / "cli" / "config.yaml").is_file()


def test_existing_run_dir_exits_2(capsys, tmp_path):
    argv = [f"run.output_dir={tmp_path}", "run.name=cli"]
    run_job(lambda cfg: None, argv=argv)
    with pytest.raises(SystemExit) as exc:
        run_job(_never_called, argv=argv)
    assert exc.value.code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "run.resume=true" in lines[0]
    assert run_job(lambda cfg: "resumed", argv=[*argv, "run.resume=true"]) == "resumed"


def test_user_errors_raised_by_the_job_exit_2(capsys, tmp_path):
    from dda_ray.data.bank import BankError
    from dda_ray.data.datasets import DatasetError
    from dda_ray.models.checkpoint import CheckpointError

    for err in (CheckpointError("bad checkpoint x"), DatasetError("bad dataset y"), BankError("bad bank z")):

        def job(cfg, err=err):
            raise err

        with pytest.raises(SystemExit) as exc:
            run_job(job, argv=[], prepare_dir=False)
        assert exc.value.code == 2
        assert _error_lines(capsys) == [f"error: {err}"]


def test_programming_errors_are_not_swallowed(tmp_path):
    def job(cfg):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_job(job, argv=[], prepare_dir=False)


def test_prepare_dir_false_creates_nothing(tmp_path):
    assert run_job(lambda cfg: cfg.run.name, argv=[f"run.output_dir={tmp_path}", "run.name=x"], prepare_dir=False) == "x"
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------- --help, --print-config, console scripts
REPO = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPTS = {
    "dda-distill": "distill_main",
    "dda-tune": "tune_main",
    "dda-train-teacher": "train_teacher_main",
    "dda-train-prior": "train_prior_main",
}


def _help_text(capsys, main, argv=("--help",)) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 0
    return capsys.readouterr().out


def _field_line(text: str, key: str) -> str:
    lines = [line for line in text.splitlines() if line.strip().startswith(f"{key} = ")]
    assert len(lines) == 1, f"{key} is not listed once in --help"
    return lines[0]


@pytest.mark.parametrize("main", sorted(CONSOLE_SCRIPTS.values()))
def test_help_lists_every_config_field_with_its_default(capsys, main):
    from dda_ray.jobs import entrypoints

    text = _help_text(capsys, getattr(entrypoints, main))
    assert "--print-config" in text and "--config" in text
    default = Config()
    assert "distill.epochs = 200  (int)" in _field_line(text, "distill.epochs")
    assert "augment.strength = 0.3  (float)" in _field_line(text, "augment.strength")
    assert "teacher.input_scale = 1.0" in _field_line(text, "teacher.input_scale")
    assert "data.eval_subset = null" in _field_line(text, "data.eval_subset")
    assert "augment.prior_channels = [32, 64, 64]" in _field_line(text, "augment.prior_channels")
    for section in dataclasses.fields(Config):
        value = getattr(default, section.name)
        if not dataclasses.is_dataclass(value):
            assert f"\n{section.name}: " in text
            continue
        assert f"\n{section.name}: " in text, section.name
        for f in dataclasses.fields(value):
            _field_line(text, f"{section.name}.{f.name}")
    # the fields' comments come along
    assert "each run writes to <output_dir>/<name>/" in text
    assert "None: exactly one pass over the training rows per epoch" in text


def test_help_of_train_prior_lists_its_own_flags(capsys):
    from dda_ray.jobs.entrypoints import train_prior_main

    text = _help_text(capsys, train_prior_main)
    for flag in ("--bank DIR", "--folder DIR", "--overwrite"):
        assert flag in text


def test_print_config_prints_the_resolved_config_and_runs_nothing(capsys, tmp_path):
    preset = REPO / "configs" / "cifar10_cpu_smoke.yaml"
    overrides = [f"run.output_dir={tmp_path}", "distill.epochs=3", "augment.strength=0.55", "teacher.mean=[0.1, 0.2, 0.3]"]
    assert run_job(_never_called, argv=["--config", str(preset), "--print-config", *overrides], preflight=_never_called) is None
    printed = capsys.readouterr().out
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    expected = load_config(preset, overrides)
    assert load_config(saved) == expected
    assert expected.distill.epochs == 3 and expected.augment.strength == 0.55 and expected.teacher.mean == [0.1, 0.2, 0.3]
    assert expected.run.name == "cifar10_cpu_smoke"  # the preset's, not a default
    assert [p.name for p in tmp_path.iterdir()] == ["printed.yaml"], "--print-config created a run directory"


def test_print_config_of_a_bad_config_is_the_usual_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run_job(_never_called, argv=["--print-config", "augment.strength=2"])
    assert exc.value.code == 2
    assert _error_lines(capsys)[0].startswith("error: augment.strength = 2")


def test_train_prior_print_config_applies_its_flags(capsys):
    from dda_ray.jobs.entrypoints import train_prior_main

    assert train_prior_main(["--folder", "imgs", "--print-config", "augment.prior_steps=5"]) is None
    cfg = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert (cfg.augment.prior_source, cfg.augment.prior_folder, cfg.augment.prior_steps) == ("folder", "imgs", 5)


def test_console_scripts_resolve_to_the_job_entry_points():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(CONSOLE_SCRIPTS)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert module == "dda_ray.jobs.entrypoints" and attr == CONSOLE_SCRIPTS[name], name
        fn = getattr(importlib.import_module(module), attr)
        assert callable(fn)
        assert list(inspect.signature(fn).parameters) == ["argv"], name  # console scripts call it without arguments


@pytest.mark.parametrize("job", ["distill", "tune", "train_teacher", "train_prior"])
def test_job_scripts_are_thin_wrappers_of_the_entry_points(job):
    source = (REPO / "jobs" / f"{job}.py").read_text()
    assert f"from dda_ray.jobs.entrypoints import {job}_main" in source.replace("source_overrides, ", "")
    assert f"    {job}_main()" in source


def test_job_script_print_config_in_a_real_process(tmp_path):
    """``python jobs/distill.py`` still works as a script: --print-config exits 0 with the YAML on stdout."""
    preset = REPO / "configs" / "cifar10_cpu_smoke.yaml"
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "distill.py"), "--config", str(preset), "--print-config", "distill.epochs=4"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = config_from_dict(yaml.safe_load(out.stdout))
    assert cfg == load_config(preset, ["distill.epochs=4"])


# ------------------------------------------------------------- the summary block
def test_summary_block_names_result_outputs_mlflow_run_and_wall_time(tmp_path):
    from dda_ray.jobs.cli import summary_block

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", "augment.model=priors/p"])
    (tmp_path / "s" / "student").mkdir(parents=True)
    (tmp_path / "s" / "student" / "meta.json").write_text("{}")
    run = ("http://user:pw@mlflow.internal:5000/", "3", "abc123")
    text = summary_block("distill", cfg, {"test_acc": 71.234, "epoch": 4}, run, 3725.4)
    lines = text.splitlines()
    assert lines[0] == "== distill finished =="
    rows = {line.split("  ")[1].strip(): line.split("  ", 2)[2].strip() for line in lines[1:]}
    assert rows == {
        "test accuracy": "71.23 %",
        "run directory": str((tmp_path / "s").resolve()),
        "student": str((tmp_path / "s" / "student").resolve()),
        "MLflow": "http://user:***@mlflow.internal:5000/#/experiments/3/runs/abc123",
        "wall time": "1h 02m 05s",
    }

    sqlite = ("sqlite:////data/out/mlflow.db", "1", "r1")
    prior = summary_block("train_prior", cfg, {"final_loss": 0.03125, "steps": 10}, sqlite, 65)
    assert "final loss     0.0312" in prior and f"prior          {(Path('priors/p')).resolve()}" in prior
    assert "mlflow ui --backend-store-uri sqlite:////data/out/mlflow.db   (then open run r1)" in prior and "1m 05s" in prior
    tune = summary_block("tune", cfg, {"trial_id": "t1", "test_acc": 50.0, "best_yaml": "/o/best.yaml"}, None, 1)
    assert "best trial" in tune and "best test accuracy  50.00 %" in tune and "best config" in tune
    assert "not tracked (see the warning above)" in tune
    untracked = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", "tracking.enabled=false"])
    assert "not tracked (tracking.enabled=false)" in summary_block("x", untracked, None, None, 0)


def test_run_job_prints_the_summary_after_a_successful_job_only(capsys, tmp_path):
    argv = [f"run.output_dir={tmp_path}", "run.name=sum", "tracking.enabled=false"]
    assert run_job(lambda cfg: {"test_acc": 12.5}, argv=argv, job="distill") == {"test_acc": 12.5}
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "== distill finished ==" and "12.50 %" in out[1] and out[-1].split()[:2] == ["wall", "time"]
    with pytest.raises(SystemExit):
        run_job(_never_called, argv=argv, job="distill")  # the run directory exists: a user error, no summary
    assert "finished" not in capsys.readouterr().out


def test_a_finished_job_ends_with_the_summary_in_a_real_process(tmp_path, tiny_assets, cifar10_decoded):
    """A seconds-long local-engine distillation through ``jobs/distill.py`` with the embedded MLflow
    default: its stdout ends with the summary, whose MLflow line opens the run it names."""
    from mlflow import MlflowClient

    from .._helpers import tiny_run_args

    args = tiny_run_args(tmp_path / "out", tiny_assets, cifar10_decoded, {
        "run.name": "summary", "run.engine": "local", "run.mode": "inversion", "run.stream_log": False,
        "data.eval_subset": 50, "distill.epochs": 1, "distill.steps_per_epoch": 2, "tracking.enabled": True,
    })  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "distill.py"), *args],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    block = out.stdout[out.stdout.rindex("== distill finished ==") :].splitlines()
    rows = {line.split("  ")[1].strip(): line.split("  ", 2)[2].strip() for line in block[1:]}
    run_dir = (tmp_path / "out" / "summary").resolve()
    assert set(rows) == {"test accuracy", "run directory", "student", "MLflow", "wall time"}, block
    assert rows["run directory"] == str(run_dir) and rows["student"] == str(run_dir / "student")
    final = json.loads((run_dir / "metrics.json").read_text())
    assert rows["test accuracy"] == f"{final['test_acc']:.2f} %"
    db = f"sqlite:///{(tmp_path / 'out').resolve() / 'mlflow.db'}"
    prefix = f"mlflow ui --backend-store-uri {db}   (then open run "
    assert rows["MLflow"].startswith(prefix), rows["MLflow"]
    run_id = rows["MLflow"][len(prefix) : -1]
    run = MlflowClient(db).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "summary"
    assert re.fullmatch(r"\d+m \d\ds", rows["wall time"])
    assert not (tmp_path / "mlruns").exists()  # artifacts and the model live beside mlflow.db, not in the current directory
    assert list((tmp_path / "out" / "mlartifacts").rglob("MLmodel"))
