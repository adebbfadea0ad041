"""The one place this package reaches into Ray internals (no public API does the same job), and the
``RAY_ADDRESS`` check built on them.

Each function wrapping a private Ray call is pinned by ``tests/engines/test_ray_compat.py`` on the installed
Ray, so an upgrade that moves or changes it fails there, loudly, not in a user's job.
"""

from __future__ import annotations

import os

from ..config import ConfigError


def recorded_cluster_address() -> str | None:
    """``host:port`` of the Ray cluster that ``RAY_ADDRESS=auto`` would attach to (``RAY_ADDRESS``,
    else the cluster ``ray start`` last recorded on this machine); None: start a local one.

    Raises ``ConnectionError`` when no running cluster is recorded. What ``ray.init(address="auto")``
    resolves, without connecting: Ray has no public call for it.
    """
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address("auto")


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
