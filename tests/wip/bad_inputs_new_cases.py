# ruff: noqa: F811 - pytest injects the imported fixture by parameter name
"""Two bad-input cases for tests/test_bad_inputs.py, not yet passing (see tests/wip/README.md).

They reuse that module's fixtures and helpers; merge them into it once they pass.
"""

import pytest

from dda_ray.api import distill, preflight
from dda_ray.cli import run_job
from tests.test_bad_inputs import assets, base_args  # noqa: F401 - the module-scoped fixture

TINY_RUN = [
    "run.mode=dda",
    "data.eval_subset=50",
    "student.arch=wrn16_1",
    "synthesis.nz=32",
    "synthesis.ngf=16",
    "synthesis.init_rounds=1",
    "synthesis.init_batch_size=8",
    "synthesis.init_g_steps=1",
    "synthesis.batch_size=8",
    "synthesis.g_steps=1",
    "distill.epochs=1",
    "distill.steps_per_epoch=1",
    "distill.batch_size=8",
    "augment.steps=4",
    "augment.batch_size=8",
]


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_unreadable_dataset_stops_before_any_work(engine, tmp_path, assets, cifar10_decoded, capsys):
    """A data.path that exists but is not a dataset: one error line, exit 2, no run directory left.
    On Ray the driver reads the data before Ray starts, so no train worker fails (and is retried) on it."""
    garbage = tmp_path / "cifar.tar.gz"
    garbage.write_bytes(b"\x1f\x8b not really gzip" * 64)
    argv = base_args(tmp_path, assets, cifar10_decoded) + [f"run.engine={engine}", f"data.path={garbage}", f"data.cache_dir={tmp_path / 'cache'}", *TINY_RUN]
    with pytest.raises(SystemExit) as exc:
        run_job(distill, argv=argv, preflight=preflight)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: cannot read archive"), err
    assert str(garbage) in err[0]
    assert not (tmp_path / "bad").exists()
    import ray

    assert not ray.is_initialized()  # refused before Ray started


def test_filter_rejecting_every_variation_errors_or_warns_never_hangs(tmp_path, assets, cifar10_decoded, capsys):
    """filter.threshold above every score: ``on_all_rejected=error`` stops with one error line and
    exit 2; ``warn`` (the default) finishes the run on the originals alone and says why."""
    argv = base_args(tmp_path, assets, cifar10_decoded) + [*TINY_RUN, "filter.threshold=1.0", "filter.on_all_rejected=error"]
    with pytest.raises(SystemExit) as exc:
        run_job(distill, argv=argv, preflight=preflight)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: the cosine filter rejected all"), err
    assert "lower filter.threshold or augment.strength" in err[0]

    argv = base_args(tmp_path, assets, cifar10_decoded) + [*TINY_RUN, "filter.threshold=1.0", "run.name=warned"]
    final = run_job(distill, argv=argv, preflight=preflight)
    out = capsys.readouterr().out
    assert "warning: the cosine filter rejected all" in out
    assert final["epoch"] == 1 and final["kept_fraction"] == 0.0
    assert (tmp_path / "warned" / "student" / "model.safetensors").exists()
