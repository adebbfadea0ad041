"""The shared job command line: --config plus overrides, one-line user errors."""

from __future__ import annotations

import pytest

from dda_ray.cli import parse_args, run_job
from dda_ray.config import Config


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
    from dda_ray.checkpoint import CheckpointError
    from dda_ray.data.bank import BankError
    from dda_ray.data.datasets import DatasetError

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
