"""Process-level helpers shared by every job: run directories, seeding, threads, devices."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .config import Config, ConfigError


class RunDirExistsError(FileExistsError):
    """The run directory exists and the user did not ask to resume."""


def prepare_run_dir(cfg: Config, filename: str = "config.yaml") -> Path:
    """Create ``<output_dir>/<name>`` and write the resolved config beside the outputs.

    An existing directory is only reused with ``run.resume=true``: nothing of an earlier run
    is overwritten by accident.
    """
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.run.resume:
        raise RunDirExistsError(
            f"run directory {run_dir} already exists; pass run.resume=true to continue it or choose another run.name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / filename)
    return run_dir


class RayAddressError(ConfigError):
    """RAY_ADDRESS is malformed or names no reachable Ray cluster."""


_GCS_PROBE = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # the first call ray.init makes to a cluster's GCS


def _probe_gcs(target: str, timeout: float) -> str | None:
    """None if a Ray GCS answers at ``target`` (host:port), else why not.

    A TCP connection is not enough: proxies (and sandboxes) accept connections and even the
    HTTP/2 handshake for hosts that are down. One unary gRPC call with an empty request is: a GCS
    replies OK, or UNAUTHENTICATED when the cluster uses token auth (still a GCS); an unreachable
    address gives UNAVAILABLE or DEADLINE_EXCEEDED, a server that is not a GCS UNIMPLEMENTED.
    """
    import grpc  # a dependency of ray

    channel = grpc.insecure_channel(target)
    try:
        channel.unary_unary(_GCS_PROBE, request_serializer=None, response_deserializer=None)(b"", timeout=timeout)
        return None
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return "something answers there but it is not a Ray GCS; the GCS port is 6379 unless ray start --port said otherwise"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return f"{code.name}: {e.details()}"
        return None  # OK, UNAUTHENTICATED, ...: a GCS answered
    finally:
        channel.close()


def _tcp_reachable(host: str, port: int, timeout: float) -> str | None:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def check_ray_address(address: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast when ``RAY_ADDRESS`` (or ``address``) names no running Ray cluster.

    ``ray.init(address=...)`` retries an unreachable GCS for minutes (over 3 minutes for
    127.0.0.1:1 with Ray 2.60), printing connection warnings, not an error. This asks the GCS
    ``ray.init`` would use (``host:port``; ``auto``: the cluster ``ray start`` recorded on this
    machine) one question, bounded by ``timeout`` seconds (:func:`_probe_gcs`; a TCP connection
    with ``RAY_USE_TLS``, and for a ``ray://`` client address). Unset, empty or ``local`` means an
    embedded cluster and passes. A dashboard URL (``http://host:8265``, what ``ray job submit``
    takes) is refused with what to do instead.
    """
    raw = (os.environ.get("RAY_ADDRESS", "") if address is None else address).strip()
    if not raw or raw == "local":
        return
    hint = "start the cluster (ray start --head), fix RAY_ADDRESS, or unset it to run on an embedded local Ray"
    if raw.startswith(("http://", "https://")):
        raise RayAddressError(
            f"RAY_ADDRESS={raw} is a dashboard address, which `ray job submit --address` takes; submit this job with "
            f"`ray job submit --address {raw} --working-dir . -- python jobs/<job>.py ...`, "
            "or set RAY_ADDRESS to the GCS address (head:6379)"
        )
    target = raw
    if raw == "auto":
        try:
            from ._ray_compat import recorded_cluster_address

            target = recorded_cluster_address() or ""
        except Exception as e:  # noqa: BLE001 - ConnectionError when no cluster is recorded
            raise RayAddressError(f"RAY_ADDRESS=auto but no running Ray cluster was found on this machine ({e}); {hint}") from e
        if not target:
            return
    client = target.startswith("ray://")
    host, _, port_text = target.removeprefix("ray://").rpartition(":")
    if not host or not port_text.isdigit():
        raise RayAddressError(f"RAY_ADDRESS={raw!r} is not of the form host:port (e.g. 10.0.0.5:6379), ray://host:port or auto")
    port = int(port_text)
    tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")
    reason = _tcp_reachable(host, port, timeout) if client or tls else _probe_gcs(f"{host}:{port}", timeout)
    if reason is not None:
        raise RayAddressError(f"no Ray cluster answers at RAY_ADDRESS={raw} ({reason}); {hint}")


def quiet_ray_data_console() -> None:
    """Ray Data prints warnings and errors only on this process's console (its ``ray-data.log``
    under the session's logs keeps every level). A default (not ``--verbose``) run calls this in
    the driver and, as Ray's ``worker_process_setup_hook``, in every worker of the job."""
    import logging

    import ray.data  # noqa: F401 - importing it installs Ray Data's handlers, at INFO

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(_not_bars_disabled)


def _not_bars_disabled(record) -> bool:
    """Drop Ray Data's "Progress bars disabled" notice: a quiet run turns them off on purpose."""
    return not str(record.msg).startswith("Progress bars disabled")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def cpu_description() -> str:
    """The CPU model and the instruction set torch's CPU kernels use here (``AVX2``, ``AVX512``, ...).

    Benchmark results record it: the same code and seed give the same numbers on one machine, but
    kernels of another instruction set round differently, so a run on another CPU follows another
    trajectory (within seed noise)."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        import platform

        model = platform.processor() or model
    return f"{model}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def package_versions(names: tuple[str, ...] = ("torch", "numpy", "pillow", "ray", "diffusers", "pyarrow")) -> dict[str, str | None]:
    """Installed versions of the packages a run's numbers depend on (None where one is absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for a GPU goes through pinned memory (an async copy)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def mark(run_dir: str | Path, event: str, **fields) -> None:
    """One line in ``<run_dir>/timeline.jsonl``: ``event`` happened now (wall clock, pid, ``fields``).

    The run's phases across its processes (trial, Train worker, augment/filter actors: set-up,
    model loads, epochs), so where a run's time goes can be read back afterwards
    (``benchmarks/tune_warm_cold.py`` does). Never fails the run."""
    import time

    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        append_jsonl(Path(run_dir) / "timeline.jsonl", {"event": event, "t": time.time(), "pid": os.getpid(), **fields})
    except OSError:
        pass


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], object], *, directory: bool = False) -> Path:
    """Write ``path`` only when complete: into a hidden temporary beside it, then ``os.replace``.

    Readers (and a resumed run) see the old content or the new, never half of it; a failed write
    leaves neither a temporary nor a changed ``path``.

    ``data`` is text, bytes, or a callable given the temporary's path to write it (``np.save``,
    ``torch.save``, ``pq.write_table``, ...). A file's temporary keeps ``path``'s suffix, so
    writers that append one (``np.save``) do not, and carries the process id, so concurrent
    writers of one path never share it (the last rename wins). With ``directory=True`` the
    callable fills an existing empty directory (``save_pretrained``); an old directory at
    ``path`` is moved aside, replaced and then deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            data(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of text (the name the run loops use)."""
    atomic_write(path, text)


def rewind_run(run_dir: str | Path, epochs_done: int, next_round: int | None) -> None:
    """Bring a run directory back to its last checkpoint before resuming from it.

    An interrupted or failed epoch may have appended its ``metrics.jsonl`` line or written its
    synthesis round before the checkpoint was saved. Lines of epochs after ``epochs_done`` (and
    a torn last line) are dropped, and rounds numbered ``>= next_round`` are removed: the resumed
    epoch re-synthesises them from the restored student with the same seeds, so the run continues
    exactly as if it had never stopped.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        keep = []
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the interruption
            if int(rec.get("epoch", 0)) <= epochs_done:
                keep.append(line)
        write_text_atomic(metrics, "".join(f"{line}\n" for line in keep))
    if next_round is not None:
        from .data.bank import round_of

        for path in sorted((run_dir / "rounds").glob("round-*.parquet")):
            if round_of(path) >= next_round:
                path.unlink()


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (run seed, round, image id, variation index, ...).

    Uses a hash of the parts' text, not Python's salted ``hash()``, so the same parts give the
    same seed in every process and on every machine.
    """
    import hashlib

    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
