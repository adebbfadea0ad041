"""A real multi-node Ray cluster on loopback: three ``ray start`` nodes (head, augment, train), each
with its own temp dir as separate machines have, the cluster's token auth, and the README's
``ray job submit`` with CLUSTER.md's resource pins.

What it asserts: where each actor ran (Ray's state API), that a lost train node is survived (its
raylet killed after the first checkpoint, a fresh train node added: the job resumes from that
epoch) and so is a lost augment node (killed mid-epoch, a fresh one added: the actor pool restarts
its actors there), and that ``metrics.jsonl`` then holds each epoch exactly once.

Each node has a loopback address of its own (127.0.0.x), as its own machine would: a process that
attaches to the cluster finds its node's raylet by IP. To read a failure, run it alone with
``DDA_KEEP_RAY_TEMP=1 python -m pytest tests/test_multinode.py -n 0 -s`` and read the job driver's
log under the head's temp dir (``/tmp/ddamn-head-*/session_latest/logs/job-driver-*.log``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ._helpers import EXCLUDES, REPO_ROOT, TOKEN_FILE, VENV_BIN, free_port, http_json, processes_of, ray_cli, ray_env, tiny_run_args

pytestmark = [pytest.mark.slow, pytest.mark.ray]

EPOCHS = 3
JOB_TIMEOUT_S = 420


class Node:
    """One ``ray start --block`` (a node), in a session of its own and a temp dir of its own."""

    def __init__(self, name: str, resources: dict, ip: str, head_gcs: str | None = None):
        self.name, self.resources, self.ip, self.lost = name, resources, ip, False
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"ddamn-{name[:5]}-", dir="/tmp"))  # short: unix socket paths
        self.log = self.temp_dir / "ray-start.log"
        ports = [
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        ]  # fmt: skip
        # Its own loopback address, as its own machine would have: a process attaching to the cluster
        # finds its node's raylet by IP, and several nodes on one IP let the job's driver attach to any
        # of them (a driver attached to the augment node hangs when that node is lost).
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--num-cpus=1", f"--resources={json.dumps(resources)}", f"--node-ip-address={ip}",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *ports]  # fmt: skip
        if head_gcs is None:
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            cmd += ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"]  # fmt: skip
        else:
            cmd += [f"--address={head_gcs}"]
        env = ray_env()
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir)

    def processes(self) -> list[int]:
        return processes_of(self.proc.pid, self.temp_dir)

    def kill(self) -> None:
        """The node is lost: every process of it killed at once (no drain, no goodbye to the GCS)."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        self.kill()
        if not os.environ.get("DDA_KEEP_RAY_TEMP"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


class Cluster:
    def __init__(self):
        self.nodes: list[Node] = []
        self.head: Node | None = None
        self.started = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.head.dashboard_port}"

    def alive_nodes(self) -> list[dict]:
        return [n for n in state_api(self.address, "nodes") if n.get("state") == "ALIVE"]

    def node_of(self, resources: dict) -> str | None:
        """The node id of the alive node with these custom resources."""
        for n in self.alive_nodes():
            res = n.get("resources_total", {})
            if all(res.get(k) == v for k, v in resources.items()):
                return n["node_id"]
        return None

    def add(self, name: str, resources: dict, timeout_s: float = 150) -> Node:
        self.started += 1
        ip = f"127.0.0.{self.started}"  # head 127.0.0.1; every node joined later, replacements too, an address of its own
        node = Node(name, resources, ip, None if self.head is None else f"127.0.0.1:{self.head.gcs_port}")
        self.nodes.append(node)
        if self.head is None:
            self.head = node
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise AssertionError(f"node {name} exited:\n{node.log.read_text()[-3000:]}")
            if http_json(f"{self.address}/api/jobs/") is not None and self.node_of(resources) is not None:
                return node
            time.sleep(1)
        raise AssertionError(f"node {name} did not join in {timeout_s:.0f}s:\n{node.log.read_text()[-3000:]}")

    def node(self, resources: dict) -> Node:
        """The (one) node of ours with these resources that has not been lost."""
        return next(n for n in self.nodes if n.resources == resources and not n.lost)

    def lose(self, node: Node) -> None:
        """``node`` is lost: killed at once, as a spot instance is taken back."""
        node.kill()
        node.lost = True

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


@pytest.fixture(scope="module")
def cluster():
    TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["sh", str(REPO_ROOT / "cluster" / "token.sh")], env={**os.environ, "DDA_RAY_TOKEN": str(TOKEN_FILE)}, check=True, capture_output=True)
    c = Cluster()
    try:
        c.add("head", {"head": 1})
        c.add("augment", {"augment": 1})
        c.add("train", {"train": 1})
        yield c
    finally:
        c.stop()
        # a worker a raylet was starting as it was killed may appear (and exit) a moment later
        deadline = time.time() + 30
        while (left := [p for n in c.nodes for p in n.processes()]) and time.time() < deadline:
            for n in c.nodes:
                n.kill()
            time.sleep(1)
        assert not left, f"processes of the test cluster survived: {left}"


def state_api(address: str, what: str) -> list[dict]:
    """Ray's state API (``ray list nodes|actors``) over the dashboard's HTTP, with the token."""
    got = http_json(f"{address}/api/v0/{what}?limit=1000&detail=1&timeout=20", timeout=30) or {}
    return got.get("data", {}).get("result", {}).get("result") or []


def actors_by_class(cluster: Cluster) -> dict[str, set[str]]:
    """Class name -> node ids it has run on (alive or dead), from Ray's state API.

    An actor not placed yet (``PENDING_CREATION``: e.g. the next epoch's pool actor waiting for the augment
    unit its predecessor still holds) has no node and is left out: placement is asserted on placed actors.
    """
    out: dict[str, set[str]] = {}
    for a in state_api(cluster.address, "actors"):
        if a.get("node_id"):
            out.setdefault(a.get("class_name", ""), set()).add(a["node_id"])
    return out


def wait_for(predicate, timeout_s: float, what: str, job_status=None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        if job_status is not None and job_status() in ("FAILED", "STOPPED", "SUCCEEDED"):
            raise AssertionError(f"the job ended ({job_status()}) while waiting for {what}")
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def test_a_distillation_job_places_its_stages_and_survives_losing_its_train_and_augment_nodes(cluster, tiny_assets, cifar10_decoded, tmp_path):
    out_dir = tmp_path / "out"
    run_dir = out_dir / "mn"
    overrides = tiny_run_args(
        out_dir, tiny_assets, cifar10_decoded,
        {
            "run.name": "mn", "run.mode": "dda", "distill.epochs": EPOCHS, "distill.steps_per_epoch": "null", "distill.lr": 0.01,
            "augment.num_variations": 1, "augment.steps": 4, "augment.strength": 0.5, "augment.batch_size": 8, "filter.threshold": 0.5,
            "resources.num_workers": 1, "resources.cpus_per_worker": 0.5, "resources.max_failures": 2,
            "resources.augment_actors": 1, "resources.augment_cpus": 0.25, "resources.filter_actors": 1, "resources.filter_cpus": 0.25,
            # CLUSTER.md's pins: the augment and the filter actor share an augment node's one unit (with {augment: 1}
            # for the augment actor, a replacement node whose filter actor came up first could never take it)
            "resources.augment_resources": "{augment: 0.5}", "resources.filter_resources": "{augment: 0.5}", "resources.worker_resources": "{train: 1}",
        },
    )  # fmt: skip
    job_id = f"dda-mn-{uuid.uuid4().hex[:8]}"
    submit = ["job", "submit", "--address", cluster.address, "--submission-id", job_id, "--no-wait", "--working-dir", str(REPO_ROOT),
              "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--", "python", "jobs/distill.py", "--config", "configs/cifar10_cpu_smoke.yaml", *overrides]  # fmt: skip
    t0 = time.time()
    r = ray_cli(*submit, timeout=120)
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"

    def status() -> str | None:
        info = http_json(f"{cluster.address}/api/jobs/{job_id}")
        return info and info.get("status")

    def epochs_done() -> list[int]:
        path = run_dir / "metrics.jsonl"
        return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    nodes = {name: cluster.node_of({name: 1}) for name in ("head", "augment", "train")}
    try:
        # 1. the first checkpoint, then the train node is lost and a fresh one joins
        wait_for(lambda: 1 in epochs_done() and (run_dir / "state.pt").exists(), 240, "epoch 1's checkpoint", status)
        placed = actors_by_class(cluster)
        cluster.lose(cluster.node({"train": 1}))
        cluster.add("train2", {"train": 1})
        # 2. mid-epoch (after epoch 2's line) the augment node is lost (spot) and a fresh one joins
        wait_for(lambda: 2 in epochs_done(), 240, "epoch 2 after the train node's loss", status)
        cluster.lose(cluster.node({"augment": 1}))
        cluster.add("augment2", {"augment": 1})
        wait_for(lambda: status() in ("SUCCEEDED", "FAILED", "STOPPED"), JOB_TIMEOUT_S - (time.time() - t0), "the job's end")
    finally:
        if status() not in ("SUCCEEDED", "FAILED", "STOPPED"):
            ray_cli("job", "stop", "--address", cluster.address, job_id, timeout=60)
    logs = ray_cli("job", "logs", "--address", cluster.address, job_id, timeout=60).stdout
    (tmp_path / "job-logs.txt").write_text(logs)
    assert status() == "SUCCEEDED", f"job ended {status()} after {time.time() - t0:.0f}s:\n{logs[-6000:]}"

    # Placement, before any loss: augment and filter actors on the augment node, the Train worker on
    # the train node, the run's EpochOrder (the stream's order) with the driver on the head.
    aug = {n for c, ns in placed.items() if "AugmentStage" in c or "FilterStage" in c for n in ns}
    assert aug == {nodes["augment"]}, placed
    assert placed.get("RayTrainWorker") == {nodes["train"]}, placed
    assert placed.get("EpochOrder") == {nodes["head"]}, placed
    # The losses were survived: a resume from epoch 1's checkpoint, each epoch exactly once.
    assert re.search(r"resuming after epoch [12]\b", logs), logs[-4000:]
    assert epochs_done() == list(range(1, EPOCHS + 1))
    after = actors_by_class(cluster)
    assert any(n not in (nodes["augment"],) for c, ns in after.items() if "AugmentStage" in c for n in ns), after  # restarted elsewhere
    assert after.get("EpochOrder") == {nodes["head"]}, after  # never moved off the driver's node
    print(f"multi-node job {job_id} succeeded in {time.time() - t0:.0f}s")
