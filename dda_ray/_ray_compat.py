"""The one place this package reaches into Ray internals (no public API does the same job).

Each function wraps one private Ray call; ``tests/test_ray_compat.py`` pins its behaviour on the
installed Ray, so an upgrade that moves or changes it fails there, loudly, not in a user's job.
"""

from __future__ import annotations


def recorded_cluster_address() -> str | None:
    """``host:port`` of the Ray cluster that ``RAY_ADDRESS=auto`` would attach to (``RAY_ADDRESS``,
    else the cluster ``ray start`` last recorded on this machine); None: start a local one.

    Raises ``ConnectionError`` when no running cluster is recorded. What ``ray.init(address="auto")``
    resolves, without connecting: Ray has no public call for it.
    """
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address("auto")
