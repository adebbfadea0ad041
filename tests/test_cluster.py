"""cluster/gpu.yaml: valid for the installed Ray's cluster launcher, and shaped as docs/CLUSTER.md says.

Validation goes through the same two calls ``ray up`` makes before it touches a cloud
(``ray.autoscaler._private.commands._bootstrap_config``): ``prepare_config`` (merge with the
provider's defaults.yaml, docker checks, per-type worker bounds) and ``validate_config``
(``ray/autoscaler/ray-schema.json`` through jsonschema, plus Ray's cross-field checks).
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster" / "gpu.yaml"
GPU_WORKER_TYPES = {"augment_gpu": "augment", "train_gpu": "train"}  # node type -> its custom resource


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_validate(config: dict) -> dict:
    """What ``ray up`` checks locally before bootstrapping the provider."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_config_passes_rays_own_schema_and_checks(raw):
    prepared = ray_up_validate(raw)
    # The raw file alone also satisfies the schema (no field relies on defaults.yaml to be valid).
    validate_config(raw)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head_cpu"
    assert set(GPU_WORKER_TYPES) <= set(prepared["available_node_types"])


def test_worker_counts_are_bounded(raw):
    assert isinstance(raw["max_workers"], int) and 0 < raw["max_workers"] <= 16
    assert raw["idle_timeout_minutes"] > 0
    types = raw["available_node_types"]
    per_type_max = 0
    for name, node in types.items():
        if name == raw["head_node_type"]:
            continue
        assert "max_workers" in node, f"{name} has no max_workers: the autoscaler could use the whole global budget"
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"] <= raw["max_workers"]
        per_type_max += node["max_workers"]
    assert per_type_max <= raw["max_workers"]
    # GPU workers scale from zero: an idle cluster holds only the CPU head.
    assert all(types[t].get("min_workers", 0) == 0 for t in GPU_WORKER_TYPES)


def test_gpu_worker_types_have_gpus_and_their_role_resource(raw):
    types = raw["available_node_types"]
    for name, role in GPU_WORKER_TYPES.items():
        res = types[name]["resources"]
        assert res.get("GPU", 0) >= 1, f"{name} advertises no GPU: {res}"
        assert res.get(role, 0) >= 1, f"{name} lacks its custom resource {role!r}: {res}"
        assert types[name]["labels"]["dda-role"] == role
        other = next(r for r in GPU_WORKER_TYPES.values() if r != role)
        assert other not in res, f"{name} also advertises {other!r}: the node types would not be distinguishable"
    head = types[raw["head_node_type"]]["resources"]
    assert head.get("GPU", 0) == 0 and not set(GPU_WORKER_TYPES.values()) & set(head)


def test_docker_image_matches_the_installed_ray_version(raw):
    image = raw["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(?P<ver>[0-9.]+)-py(?P<py>3\d+)-gpu", image)
    assert m, f"unexpected image {image!r}; expected rayproject/ray:<ray version>-py3XX-gpu"
    assert m["ver"] == ray.__version__, f"cluster image runs Ray {m['ver']}, this client is {ray.__version__}"
    assert m["py"] == f"{sys.version_info.major}{sys.version_info.minor}", "cluster and client Python versions differ"
    for key in ("head_image", "worker_image"):
        assert key not in raw["docker"], f"docker.{key} would override the checked image"


def test_setup_installs_this_package_with_its_gpu_extra(raw):
    assert "gpu" in importlib.metadata.metadata("dda_ray").get_all("Provides-Extra")
    setup = " ".join(raw["setup_commands"])
    assert 'pip install -e ".[gpu]"' in setup
    # ... from the working tree that file_mounts syncs to every node.
    (remote,) = [r for r, local in raw["file_mounts"].items() if local == "."]
    assert f"cd {remote}" in setup
    # Ray stays at the image's version.
    assert re.search(r"ray\[[a-z,]+\]==", setup)
    excluded = set(raw["rsync_exclude"])
    assert {".venv", "outputs", ".git"} <= excluded


def test_every_node_gets_mlflow_server_and_shared_storage(raw):
    opts = " ".join(raw["docker"]["run_options"])
    m = re.search(r"-e MLFLOW_TRACKING_URI=(\S+)", opts)
    assert m and m[1].startswith(("http://", "https://")), "a cluster needs an MLflow server, not a local file store"
    mount = re.search(r"-v (/\S+):(/\S+)", opts)
    assert mount and mount[1] == mount[2], "shared storage must sit at the same path on host and in the container"
    assert any(mount[1] in c and "mount" in c for c in raw["initialization_commands"])


def test_header_shows_the_launch_flow():
    header = "".join(line for line in CLUSTER_YAML.read_text().splitlines(keepends=True) if line.startswith("#"))
    for cmd in ("ray up cluster/gpu.yaml", "ray job submit", "--working-dir .", "python jobs/distill.py --config configs/", "ray down cluster/gpu.yaml"):
        assert cmd in header
    # token auth: the token made before `ray up`, the CLI told to send it
    assert header.index("cluster/token.sh") < header.index("ray up cluster/gpu.yaml") < header.index("RAY_AUTH_MODE=token") < header.index("ray job submit")


def test_every_node_starts_ray_with_token_auth_from_the_mounted_token(raw):
    mounted = {remote for remote, local in raw["file_mounts"].items() if local.endswith("dda-ray-gpu.token")}
    assert mounted == {"~/.ray/dda-ray-gpu.token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (cmd,) = [c for c in raw[key] if "ray start" in c]
        assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.ray/dda-ray-gpu.token;" in cmd, cmd
    assert "--dashboard-host=127.0.0.1" in next(c for c in raw["head_start_ray_commands"] if "ray start" in c)
    assert not any(p.name.endswith(".token") for p in REPO_ROOT.rglob("*.token"))  # no token in the repository


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c["available_node_types"]["train_gpu"]["resources"].update(GPU=0.5), r"0\.5 is not of type 'integer'"),
        (lambda c: c.update(max_workers="six"), r"'six' is not of type 'integer'"),
        (lambda c: c["docker"].update(run_options="-e MLFLOW_TRACKING_URI=http://x"), r"is not of type 'array'"),
        (lambda c: c["available_node_types"]["augment_gpu"].update(gpus=1), r"Additional properties are not allowed \('gpus' was unexpected\)"),
    ],
    ids=["fractional-gpu-resource", "max-workers-string", "run-options-string", "unknown-node-field"],
)
def test_mutated_config_fails_validation_with_a_clear_error(raw, mutate, match):
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError, match=match) as info:
        ray_up_validate(bad)
    assert list(info.value.absolute_path), "the error names where in the config the bad value is"


def test_min_workers_above_the_global_bound_is_refused(raw):
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["train_gpu"].update(min_workers=7, max_workers=7)
    with pytest.raises(ValueError, match="max_workers"):
        ray_up_validate(bad)
