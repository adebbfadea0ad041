"""Before a multi-node run works: is every path the stages exchange files through shared?

The stages of one run hand each other files (rounds, the bank, the augment cache, stream logs, Ray
Train's checkpoints; docs/CLUSTER.md, "Shared storage"). On nodes that do not share
``run.output_dir`` a run would not fail but go wrong quietly (a read task that lists no new round,
a restarted worker group that finds no checkpoint). So a run on a cluster of several nodes first
writes a probe file under each such path on the driver's node and asks one task on every other
alive node to read it back; a path some node cannot see stops the run with one error naming the
path and the node.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..config import Config, ConfigError


class SharedDiskError(ConfigError):
    """A path the run's stages exchange files through is not visible from every node."""


def _read_probe(path: str) -> str | None:
    """The probe file's content as this process sees it, or None when it cannot see the file."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def shared_paths(cfg: Config) -> dict[str, Path]:
    """The folders (by config field) whose files another node must see: the run's outputs and,
    in ``dda`` mode, the augment cache."""
    from .stages import augment_cache_root

    paths = {"run.output_dir": Path(cfg.run.output_dir)}
    if cfg.run.mode == "dda":
        paths["augment.cache_dir"] = augment_cache_root(cfg)
    return paths


def check_shared_paths(paths: dict[str, Path], nodes: list[dict] | None = None, timeout_s: float = 120.0) -> list[str]:
    """Write a probe file under each of ``paths`` here and read it back from one task on every
    node of ``nodes`` (default: every alive node of the Ray cluster but this process's); raise
    :class:`SharedDiskError` naming the first path and node that cannot see it. A cluster of one
    node passes at once. Returns the node addresses checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    if nodes is None:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not nodes:
        return []
    token = secrets.token_hex(16)
    probes: dict[str, Path] = {}
    try:
        for field, folder in paths.items():
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".dda-shared-check-{token}"
            probe.write_text(f"{token} {field}")
            probes[field] = probe
        read = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
        pending = {}
        for node in nodes:
            where = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            for field, probe in probes.items():
                pending[(node["NodeManagerAddress"], field)] = (read.options(scheduling_strategy=where).remote(str(probe)), node)
        seen = dict(zip(pending, ray.get([ref for ref, _ in pending.values()], timeout=timeout_s), strict=True))
        for (address, field), content in seen.items():
            if content != f"{token} {field}":
                node = pending[(address, field)][1]
                kinds = sorted(k for k in node.get("Resources", {}) if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:") and not k.startswith("accelerator_type"))
                raise SharedDiskError(
                    f"{field} = {paths[field]} written on the driver's node is not visible from node {address}"
                    f"{' (resources ' + ', '.join(kinds) + ')' if kinds else ''}: the stages of a multi-node run exchange files through it, "
                    "so every node must mount it at the same path (a shared file system; docs/CLUSTER.md, \"Shared storage\")"
                )
        return sorted({a for a, _ in seen})
    finally:
        for probe in probes.values():
            try:
                os.unlink(probe)
            except OSError:
                pass


__all__ = ["SharedDiskError", "check_shared_paths", "shared_paths"]
