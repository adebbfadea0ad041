"""Bad inputs: one clear error line, exit status 2, nothing existing overwritten, nothing half-written.

Each case runs the distillation job's real command-line path (``run_job(distill, preflight=...)``,
what ``jobs/distill.py`` calls) in-process; one case runs the script in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dda_ray.api import distill, preflight
from dda_ray.jobs.cli import run_job
from dda_ray.models.checkpoint import save_classifier

from ._helpers import teacher_with_stats
from ._tiny_pipelines import build_tiny_prior

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    save_classifier(teacher_with_stats(), root / "teacher", arch="wrn16_1", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    build_tiny_prior(root / "prior", num_classes=10, image_size=32)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "meta.json").write_text((root / "teacher" / "meta.json").read_text())
    (root / "corrupt" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}, root / "payload.pth")
    (root / "bank").mkdir()
    (root / "bank" / "round-00000.parquet").write_bytes(b"not parquet at all")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "foreign").mkdir()
    pq.write_table(pa.table({"a": [1, 2]}), root / "foreign" / "round-00000.parquet")
    return root


def base_args(tmp_path: Path, assets: Path, cifar) -> list[str]:
    return [
        f"run.output_dir={tmp_path}",
        "run.name=bad",
        "run.engine=local",
        f"data.path={cifar.path}",
        f"data.cache_dir={cifar.cache_dir}",
        "teacher.arch=wrn16_1",
        f"teacher.checkpoint={assets / 'teacher'}",
        f"augment.model={assets / 'prior'}",
        "tracking.enabled=false",
    ]


def never(cfg):
    raise AssertionError("the job started despite a bad input")


CASES = {
    "missing dataset path": (["data.path=/nonexistent/cifar.tar.gz"], "data.path"),
    "teacher class count mismatch": (["data.num_classes=100"], "classes"),
    "teacher architecture mismatch": (["teacher.arch=wrn16_2"], "wrn16_2"),
    "corrupt teacher checkpoint": (["teacher.checkpoint={assets}/corrupt"], "corrupt"),
    "pickled code in a .pth": (["teacher.checkpoint={assets}/payload.pth"], "weights-only"),
    "strength out of range": (["augment.strength=1.5"], "augment.strength"),
    "guidance out of range": (["augment.guidance=-1"], "augment.guidance"),
    "threshold out of range": (["filter.threshold=2"], "filter.threshold"),
    "negative epochs": (["distill.epochs=-3"], "distill.epochs"),
    "unknown architecture": (["student.arch=resnet9000"], "student.arch"),
    "unknown augment backend": (["augment.backend=dalle"], "augment.backend"),
    "corrupt bank": (["synthesis.bank_dir={assets}/bank"], "corrupt"),
    "foreign bank": (["synthesis.bank_dir={assets}/foreign"], "not a dda_ray bank"),
    "xformers missing": (["augment.xformers=true"], "xformers"),
    "missing diffusion model": (["augment.model=./no/such/prior"], "augment.model"),
    "missing teacher checkpoint": (["teacher.checkpoint=/nonexistent/teacher"], "does not exist"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_error_line_and_exit_2(name, tmp_path, assets, cifar10_decoded, capsys):
    overrides, expected = CASES[name]
    argv = base_args(tmp_path, assets, cifar10_decoded) + [o.format(assets=assets) for o in overrides]
    with pytest.raises(SystemExit) as exc:
        run_job(never, argv=argv, preflight=preflight)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_existing_run_directory_is_not_overwritten_without_resume(tmp_path, assets, cifar10_decoded, capsys):
    run_dir = tmp_path / "bad"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"test_acc": 42}')
    with pytest.raises(SystemExit) as exc:
        run_job(never, argv=base_args(tmp_path, assets, cifar10_decoded), preflight=preflight)
    assert exc.value.code == 2
    assert "run.resume=true" in capsys.readouterr().err
    assert (run_dir / "metrics.json").read_text() == '{"test_acc": 42}'
    assert not (run_dir / "config.yaml").exists()


def test_unreachable_tracking_server_stops_before_work(tmp_path, assets, cifar10_decoded, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    argv = base_args(tmp_path, assets, cifar10_decoded) + ["tracking.enabled=true", f"tracking.uri=http://127.0.0.1:{port}"]
    with pytest.raises(SystemExit) as exc:
        run_job(distill, argv=argv, preflight=preflight)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and "tracking.on_unreachable=warn" in err
    assert not (tmp_path / "bad" / "bank").exists()  # no synthesis happened
    assert not (tmp_path / "bad").exists()


def test_script_exits_2_in_a_real_process(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "distill.py"), "--config", str(ROOT / "configs" / "cifar10_cpu_smoke.yaml"), "augment.strength=0", f"run.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: augment.strength = 0")
    assert not list(tmp_path.iterdir())


def _run_distill(args: list[str], env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    import time

    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "distill.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )  # fmt: skip
    return out, time.monotonic() - t0


@pytest.mark.parametrize("address", ["127.0.0.1:1", "203.0.113.1:6379"], ids=["closed-port", "dead-host"])
def test_unreachable_ray_address_fails_fast_in_a_real_process(tmp_path, assets, cifar10_decoded, address):
    """ray.init retries an unreachable GCS for minutes; the job says so in seconds (one error line,
    exit 2) and leaves no run directory. 203.0.113.0/24 is TEST-NET-3: no host answers there
    (behind a proxy that accepts every connection, the GCS question still gets no GCS answer)."""
    args = base_args(tmp_path, assets, cifar10_decoded) + ["run.engine=ray"]
    out, seconds = _run_distill(args, env={"RAY_ADDRESS": address})
    assert out.returncode == 2, out.stderr[-3000:]
    err = error_lines(out.stderr)
    assert len(err) == 1 and err[0].startswith(f"error: no Ray cluster answers at RAY_ADDRESS={address}"), err
    assert "ray start --head" in err[0]
    assert not (tmp_path / "bad").exists()
    if address == "127.0.0.1:1":  # refused at once: the job's imports and set-up are all it pays
        assert seconds < 30, seconds
    else:  # the GCS question is bounded by a 5 s deadline: at most that (and noise) over a refused port's run, taken now
        _, refused = _run_distill(args, env={"RAY_ADDRESS": "127.0.0.1:1"})
        assert seconds < refused + 15, (seconds, refused)


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:1", "no Ray cluster answers at RAY_ADDRESS=127.0.0.1:1 (UNAVAILABLE"),
        ("ray://127.0.0.1:1", "no Ray cluster answers at RAY_ADDRESS=ray://127.0.0.1:1 (ConnectionRefusedError"),
        ("no-such-host.invalid:6379", "no Ray cluster answers"),
        ("http://127.0.0.1:8265", "is a dashboard address, which `ray job submit --address` takes"),
        ("head-node", "is not of the form host:port"),
    ],
)
def test_ray_address_check_names_the_problem(address, expected):
    import time

    from dda_ray.engines.ray_compat import RayAddressError, check_ray_address

    t0 = time.monotonic()
    with pytest.raises(RayAddressError) as exc:
        check_ray_address(address, timeout=5)
    assert expected in str(exc.value) and time.monotonic() - t0 < 15
    for embedded in ("", "local"):
        check_ray_address(embedded)


def test_ray_address_check_asks_for_a_gcs_not_just_a_listening_port():
    """A gRPC server that answers the GCS's GetClusterId passes; one that does not know it (a
    proxy, the wrong port) is refused. Checked against a real Ray 2.60 GCS by hand: it answers OK,
    or UNAUTHENTICATED under token auth, and both pass."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from dda_ray.engines.ray_compat import _GCS_PROBE, RayAddressError, check_ray_address

    service, method = _GCS_PROBE.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(lambda request, context: b"")})
    for handlers, ok in (([handler], True), ([], False)):
        server = grpc.server(ThreadPoolExecutor(max_workers=1), handlers=handlers)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            if ok:
                check_ray_address(f"127.0.0.1:{port}")
            else:
                with pytest.raises(RayAddressError, match="not a Ray GCS"):
                    check_ray_address(f"127.0.0.1:{port}")
        finally:
            server.stop(0)


def test_undecodable_dataset_image_is_named_in_one_error_line_in_a_real_process(tmp_path, assets):
    """A corrupt JPEG inside an image-folder archive: the job names the archive member, suggests
    data.skip_corrupt=true, exits 2 and leaves no run directory."""
    import io
    import tarfile

    from PIL import Image

    def png(rgb) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
        return buf.getvalue()

    members = {f"data/{split}/{cls}/{i}.png": png((i, 50, 100)) for split in ("train", "test") for cls in ("cat", "dog") for i in range(2)}
    members["data/train/dog/broken.jpg"] = b"\xff\xd8\xff\xe0 cut short"
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    args = [
        f"run.output_dir={tmp_path}", "run.name=bad", "run.engine=local", f"data.path={archive}", f"data.cache_dir={tmp_path / 'cache'}",
        "teacher.arch=wrn16_1", f"teacher.checkpoint={assets / 'teacher'}", f"augment.model={assets / 'prior'}", "tracking.enabled=false",
    ]  # fmt: skip
    out, _ = _run_distill(args)
    assert out.returncode == 2, out.stderr[-3000:]
    err = error_lines(out.stderr)
    assert len(err) == 1 and f"cannot decode image member data/train/dog/broken.jpg of archive {archive}" in err[0], err
    assert "data.skip_corrupt=true" in err[0]
    assert not (tmp_path / "bad").exists()


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


def error_lines(stderr: str) -> list[str]:
    """The CLI's ``error:`` line(s). A job that got as far as real work also has progress bars
    (initial bank, diffusers' pipeline loading) on stderr; the error line must be the last line
    and the only one, with no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1] == errors[-1], lines[-5:]
    return errors


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_unreadable_dataset_stops_before_any_work(engine, tmp_path, assets, cifar10_decoded, capsys):
    """A data.path that exists but is not a dataset: one error line, exit 2, no run directory left.
    On Ray the driver reads the data before Ray starts, so no train worker fails (and is retried) on it."""
    import ray

    assert not ray.is_initialized()
    garbage = tmp_path / "cifar.tar.gz"
    garbage.write_bytes(b"\x1f\x8b not really gzip" * 64)
    argv = base_args(tmp_path, assets, cifar10_decoded) + [f"run.engine={engine}", f"data.path={garbage}", f"data.cache_dir={tmp_path / 'cache'}", *TINY_RUN]
    with pytest.raises(SystemExit) as exc:
        run_job(distill, argv=argv, preflight=preflight)
    assert exc.value.code == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: cannot read archive"), err
    assert str(garbage) in err[0]
    assert not (tmp_path / "bad").exists()  # no run directory left behind, not even an empty one
    assert not ray.is_initialized()  # refused before Ray started


def test_filter_rejecting_every_variation_errors_or_warns_never_hangs(tmp_path, assets, cifar10_decoded, capsys):
    """filter.threshold above every score: ``on_all_rejected=error`` stops with one error line and
    exit 2; ``warn`` (the default) finishes the run on the originals alone and says why."""
    argv = base_args(tmp_path, assets, cifar10_decoded) + [*TINY_RUN, "filter.threshold=1.0", "filter.on_all_rejected=error"]
    with pytest.raises(SystemExit) as exc:
        run_job(distill, argv=argv, preflight=preflight)
    assert exc.value.code == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: the cosine filter rejected all"), err
    assert "lower filter.threshold or augment.strength" in err[0]

    # warn: said once per epoch with the counts, not once per filtered batch (4 batches of 2 parents per epoch here)
    more = ["filter.threshold=1.0", "run.name=warned", "augment.batch_size=2", "distill.epochs=2", "synthesis.rounds_per_epoch=1"]
    final = run_job(distill, argv=base_args(tmp_path, assets, cifar10_decoded) + [*TINY_RUN, *more], preflight=preflight)
    captured = capsys.readouterr()
    said = [line for line in (captured.out + captured.err).splitlines() if "rejected every variation" in line]
    assert [line.split(":")[0:2] for line in said] == [["warning", " epoch 1"], ["warning", " epoch 2"]], said
    counts = [re.search(r"every variation of (\d+) of (\d+) batches", line).groups() for line in said]
    assert all(a == b and int(a) > 1 for a, b in counts), said  # several batches, one line
    assert all("kept 0 of" in line and "Lower filter.threshold or augment.strength" in line for line in said), said
    assert final["epoch"] == 2 and final["kept_fraction"] == 0.0 and final["all_rejected_batches"] == int(counts[1][0])
    assert (tmp_path / "warned" / "student" / "model.safetensors").exists()
