"""The Ray pipeline on a real local Ray: augment/filter actor pools streaming into Ray Train."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dda_ray.config import load_config
from dda_ray.data.bank import read_bank
from dda_ray.data.pool import slot_order, split_slots
from dda_ray.models.checkpoint import load_classifier
from dda_ray.runtime import prepare_run_dir, read_jsonl

from .._helpers import ray_config, stream_records, tiny_run_args


def test_dda_streams_augmentation_into_training_with_exact_row_accounting(tmp_path, tiny_assets, cifar10_decoded, ray_cluster):
    from dda_ray.engines.ray_train import run_ray

    cfg = ray_config(tmp_path, tiny_assets, cifar10_decoded)
    final = run_ray(cfg)
    run_dir = cfg.run_dir
    epochs = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in epochs] == [1, 2]
    filt = stream_records(run_dir, "filter")
    for epoch, m in enumerate(epochs):
        trained = read_jsonl(run_dir / "stream" / f"train-rank0-epoch{epoch}.jsonl")
        ids = [i for r in trained for i in r["ids"]]
        originals = 16 * (cfg.synthesis.init_rounds + epoch + 1)  # initial bank + one round per epoch so far
        # variations produced = kept + rejected; every original and every kept variation trained on exactly once
        assert m["variations"] == 2 * originals == m["kept"] + m["rejected"]
        assert len(ids) == len(set(ids)) == originals + m["kept"] == m["rows"]
        assert sum("-v" in i for i in ids) == m["kept"]
    # The stream is the epoch pool's slot order for (seed, epoch 0, pass 0), rejected variations left
    # out: a uniform shuffle over every round (dda_ray.data.pool), the order the local engine uses too.
    pool_ids = np.concatenate([read_bank(run_dir / "bank").ids, read_bank(run_dir / "rounds").ids[:16]])
    rows, var = split_slots(slot_order(len(pool_ids), 2, cfg.run.seed, 0, 0), 2)
    expected = [p if v < 0 else f"{p}-v{v}" for p, v in zip(pool_ids[rows], var.tolist(), strict=True)]
    trained0 = [i for r in read_jsonl(run_dir / "stream" / "train-rank0-epoch0.jsonl") for i in r["ids"]]
    assert trained0 == [i for i in expected if i in set(trained0)]
    # Streaming: epoch 1's first training batch came before augmentation finished its input.
    first_train = read_jsonl(run_dir / "stream" / "train-rank0-epoch0.jsonl")[0]["t"]
    per_actor = sorted((read_jsonl(p) for p in (run_dir / "stream").glob("augment-*.jsonl")), key=lambda recs: recs[0]["t0"])
    epoch0_augment = per_actor[0]  # the actor pool is rebuilt for every epoch's execution
    # every original is diffused once (its first variation slot); its other slots read the cache
    assert sum(r["parents"] - r["cache_hits"] for r in epoch0_augment) == 16 * (cfg.synthesis.init_rounds + 1) == epochs[0]["augment_diffused"]
    assert first_train < max(r["t1"] for r in epoch0_augment)
    # Epoch 2 diffuses only the new round: the rest comes from the variation cache.
    assert epochs[1]["augment_diffused"] == 16
    assert sum(r["variations"] for r in filt) == sum(m["variations"] for m in epochs)
    # Outputs: final metrics, student checkpoint, Ray Train checkpoints, image grids.
    assert json.loads((run_dir / "metrics.json").read_text())["test_acc"] == final["test_acc"]
    load_classifier(run_dir / "student", "wrn16_1", 10)
    assert list((run_dir / "grids").glob("*.png"))
    assert (run_dir / "state.pt").exists()  # resume point (local mode keeps no Ray checkpoints)
    # Rounds made with the student record their provenance, like the initial bank's.
    from dda_ray.data.bank import bank_files, read_provenance

    initial = read_provenance(bank_files(run_dir / "bank")[0])
    rounds = [read_provenance(f) for f in bank_files(run_dir / "rounds")]
    assert len(rounds) == 2 and all(r["teacher"] == initial["teacher"] and "batch_size=16" in r["synthesis"] for r in rounds)


def test_two_ddp_workers_split_the_stream_without_losing_rows(tmp_path, tiny_assets, cifar10_decoded, ray_cluster):
    from dda_ray.engines.ray_train import run_ray

    cfg = ray_config(tmp_path, tiny_assets, cifar10_decoded, **{"resources.num_workers": 2, "distill.epochs": 1, "synthesis.init_batch_size": 15})
    run_ray(cfg)
    (m,) = read_jsonl(cfg.run_dir / "metrics.jsonl")
    per_rank = [[i for r in read_jsonl(cfg.run_dir / "stream" / f"train-rank{k}-epoch0.jsonl") for i in r["ids"]] for k in (0, 1)]
    assert all(per_rank)  # both workers trained
    ids = per_rank[0] + per_rank[1]
    originals = 15 * 3 + 16  # an odd total: the uneven tail is kept, not dropped
    assert len(ids) == len(set(ids)) == originals + m["kept"]
    assert list((cfg.run_dir / "ray").rglob("state.pt"))  # Ray Train persisted the epoch's checkpoint
    from dda_ray.data.bank import bank_files, read_provenance

    (round_file,) = bank_files(cfg.run_dir / "rounds")  # written by rank 0 only, with its provenance
    assert read_provenance(round_file)["teacher"] == read_provenance(bank_files(cfg.run_dir / "bank")[0])["teacher"]


@pytest.mark.parametrize("method", ["dda", "fast"])
def test_initial_bank_from_ray_tasks_matches_the_driver_built_one(tmp_path, tiny_assets, cifar10_decoded, ray_cluster, monkeypatch, method):
    """dda: rounds spread over two tasks; fast (a chained method, as cmi): the one chain in one task, the
    driver continuing from it."""
    import numpy as np
    import torch

    from dda_ray.data.bank import bank_files, read_bank, read_provenance
    from dda_ray.models.checkpoint import load_teacher
    from dda_ray.synthesis.initial_bank import build_initial_bank
    from dda_ray.synthesis.synthesizer import Synthesizer, build_synthesizer

    banks, chains = {}, {}
    for tasks in (0, 2):
        cfg = ray_config(tmp_path / f"t{tasks}", tiny_assets, cifar10_decoded, **{"resources.synthesis_tasks": tasks, "resources.synthesis_cpus": 0.5, "synthesis.method": method}).with_absolute_paths()
        teacher, normalize, _ = load_teacher(cfg)
        torch.set_num_threads(1)
        if tasks:  # the driver must not synthesise: the rounds come from the Ray tasks' processes
            monkeypatch.setattr(Synthesizer, "run_round", lambda *a, **k: pytest.fail("synthesised in the driver"))
        synth = build_synthesizer(cfg, teacher, normalize)
        bank_dir = build_initial_bank(cfg, synth, progress=False)
        assert len(bank_files(bank_dir)) == 3
        banks[tasks] = (read_bank(bank_dir), read_provenance(bank_files(bank_dir)[0]))
        chains[tasks] = synth.state_dict()
    (local, prov_local), (remote, prov_remote) = banks[0], banks[2]
    assert prov_local == prov_remote
    assert local.ids.tolist() == remote.ids.tolist() and np.array_equal(local.labels, remote.labels)
    assert np.abs(local.images.astype(int) - remote.images.astype(int)).mean() < 1.0  # same seeds per round
    if method == "fast":  # the driver holds the chain the task left (what its rounds with the student continue)
        assert chains[0]["rounds_done"] == chains[2]["rounds_done"] == 3
        for k, v in chains[0]["meta_generator"].items():
            assert torch.allclose(v.float(), chains[2]["meta_generator"][k].float(), atol=1e-4), k


def test_real_kd_stream_mixes_classes_in_every_batch(tmp_path, tiny_assets, cifar10_decoded, ray_cluster):
    from dda_ray.data import load_data
    from dda_ray.engines.ray_train import run_ray

    cfg = ray_config(tmp_path, tiny_assets, cifar10_decoded, **{"run.mode": "real_kd", "data.train_subset": 400, "distill.epochs": 1, "distill.steps_per_epoch": 6, "distill.batch_size": 32})
    run_ray(cfg)
    labels = load_data(cfg.data, progress=False).train.subset(400, cfg.run.seed).labels
    batches = read_jsonl(cfg.run_dir / "stream" / "train-rank0-epoch0.jsonl")
    assert len(batches) == 6
    for b in batches:  # the image folder lists class by class; a batch of one class would train nothing useful
        classes = {int(labels[int(i.split("-")[1])]) for i in b["ids"]}
        assert len(classes) >= 5, classes
    first_pass = [i for b in batches if b["pass"] == 0 for i in b["ids"]]
    assert len(first_pass) == len(set(first_pass))


@pytest.mark.ray
def test_embedded_ray_uses_token_auth_without_writing_a_token_file(tmp_path):
    """Also: ``run.verbose`` (``--verbose``) brings Ray's own INFO logs back (Ray Data's execution
    plan here); tests/test_job_submit.py checks that a default run leaves them out."""
    import subprocess
    import sys

    script = (
        "import os, ray\n"
        "from dda_ray.config import load_config\n"
        "from dda_ray.engines.ray_train import init_ray\n"
        "init_ray(load_config(None, ['run.verbose=true']))\n"
        "print(ray.data.range(4).map_batches(lambda b: b).count())\n"
        "print(ray.get(ray.remote(num_cpus=0.1)(lambda: os.environ.get('RAY_AUTH_MODE')).remote()))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "token"  # the cluster's processes run with token auth on
    assert "started a local Ray" in out.stdout
    assert "Execution plan of Dataset" in out.stderr + out.stdout  # verbose: Ray Data's INFO lines
    assert not (tmp_path / ".ray").exists()  # and no token file was left in the home directory


def test_custom_resources_pin_each_stage_to_its_node_type(tmp_path, ray_cluster):
    from dda_ray.engines.ray_train import build_dataset, scaling_config

    def remote_args(ds) -> list[dict]:
        out, op = [], ds._logical_plan.dag
        while op is not None:
            if getattr(op, "ray_remote_args", None):
                out.append(op.ray_remote_args)
            op = op.input_dependencies[0] if op.input_dependencies else None
        return out[::-1]  # in graph order

    pins = ["resources.augment_resources={augment: 1}", "resources.filter_resources.augment=0.5", "resources.worker_resources={train: 1}", f"run.output_dir={tmp_path}"]
    cfg = load_config("configs/cifar10_cpu_smoke.yaml", pins)
    *_, augment, filt = remote_args(build_dataset(cfg))  # read, augment, filter
    assert augment["resources"] == {"augment": 1} and filt["resources"] == {"augment": 0.5}
    (fused,) = remote_args(build_dataset(load_config("configs/cifar10_cpu_smoke.yaml", [*pins, "resources.fused_stages=true"])))[-1:]
    assert fused["resources"] == {"augment": 1}
    # host memory declared per actor (Ray packs no more than fit; Ray Data's "uses more memory than
    # requested" warning stays away): the local prior's defaults, the fused actor holding both models
    gib = 2**30
    assert (augment["memory"], filt["memory"], fused["memory"]) == (2 * gib, 1.5 * gib, 3.5 * gib)
    assert remote_args(build_dataset(cfg))[0]["memory"] == 1 * gib  # the pool's read task
    sized = load_config("configs/cifar10_cpu_smoke.yaml", [*pins, "resources.augment_memory_gb=4", "resources.filter_memory_gb=0.5"])
    *_, augment, filt = remote_args(build_dataset(sized))
    assert (augment["memory"], filt["memory"]) == (4 * gib, 0.5 * gib)
    assert scaling_config(cfg).resources_per_worker == {"CPU": cfg.resources.cpus_per_worker, "train": 1}
    # nothing pinned by default
    plain = load_config("configs/cifar10_cpu_smoke.yaml", [f"run.output_dir={tmp_path}"])
    assert all("resources" not in a for a in remote_args(build_dataset(plain)))


def test_the_filter_takes_one_augment_batch_per_call(tmp_path, ray_cluster):
    """The augment stage hands on one row per slot it got; a filter batch of one augment batch lets the
    stream's first rows (and every later block) through as soon as one augment batch is done."""
    from dda_ray.engines.ray_train import build_dataset

    cfg = load_config("configs/cifar10_cpu_smoke.yaml", [f"run.output_dir={tmp_path}", "augment.batch_size=24"])
    op, sizes = build_dataset(cfg)._logical_plan.dag, []
    while op is not None:
        if hasattr(op, "batch_size"):
            sizes.append(op.batch_size)
        op = op.input_dependencies[0] if op.input_dependencies else None
    assert sizes == [24, 24]  # filter, augment


@pytest.mark.parametrize("method", ["dda", "fast"])
def test_both_engines_train_on_the_same_batches_and_adversarial_rounds_let_the_student_learn(tmp_path, cifar10_decoded, ray_cluster, method):
    """The shipped teacher, rounds with the student and the adversarial term on (dda: rotation, fast: KL): the Ray
    engine and the local engine give the same per-epoch metrics for one seed, and on both the KD
    loss falls from the first epoch to the second (on the landed code before this test the Ray engine's stayed flat).
    ``fast``: the Ray worker continues the meta-generator chain from the bank the driver made, as the
    local engine continues its own."""
    from dda_ray.engines.local import run_local
    from dda_ray.engines.ray_train import run_ray

    teacher = Path(__file__).resolve().parents[2] / "checkpoints" / "cifar10_wrn16_2"
    overrides = {
        "run.mode": "inversion",
        "synthesis.method": method,
        "teacher.arch": "wrn16_2",
        "teacher.checkpoint": teacher,
        "synthesis.init_rounds": 2,
        "synthesis.init_batch_size": 32,
        "synthesis.init_g_steps": 4,
        "synthesis.batch_size": 32,
        "synthesis.g_steps": 3,
        "synthesis.rounds_per_epoch": 1,
        "distill.epochs": 2,
        "distill.steps_per_epoch": 10,
        "distill.batch_size": 32,
        "distill.lr": 0.05,
        "data.eval_subset": 200,
    }
    metrics = {}
    for engine in ("ray", "local"):
        args = tiny_run_args(tmp_path / engine, tmp_path, cifar10_decoded, {**overrides, "run.name": engine, "run.engine": engine})
        cfg = load_config(None, args).with_absolute_paths()
        prepare_run_dir(cfg)
        (run_ray if engine == "ray" else run_local)(cfg, **({} if engine == "ray" else {"progress": False}))
        metrics[engine] = read_jsonl(cfg.run_dir / "metrics.jsonl")
    keys = ("test_acc", "test_loss", "loss_kd", "loss_ce", "loss_fea", "steps", "rows", "next_round") + (("loss_rot",) if method == "dda" else ())
    for ray_epoch, local_epoch in zip(metrics["ray"], metrics["local"], strict=True):
        for k in keys:
            assert ray_epoch[k] == pytest.approx(local_epoch[k], rel=1e-5, abs=1e-6), (ray_epoch["epoch"], k)
    kd = [m["loss_kd"] for m in metrics["ray"]]
    assert kd[1] < kd[0], kd


def test_extra_banks_and_batch_mixing_give_the_same_run_on_both_engines(tmp_path, tiny_assets, cifar10_decoded, ray_cluster):
    """The control arms' pieces on Ray: photo-crop rows (distill.extra_banks) stream beside the bank
    and CutMix draws from the run's generator, so the Ray engine trains on the same batches as the
    local engine; the crops are in the stream."""
    from dda_ray.augment.crops import write_crop_bank
    from dda_ray.engines.local import run_local
    from dda_ray.engines.ray_train import run_ray

    base = {"run.mode": "inversion", "augment.prior_source": "photos", "synthesis.rounds_per_epoch": 0, "distill.epochs": 1, "distill.steps_per_epoch": 4}
    crops = write_crop_bank(load_config(None, tiny_run_args(tmp_path / "c", tiny_assets, cifar10_decoded, base)), tmp_path / "crops", 24, seed=0, progress=False)
    metrics = {}
    for engine in ("ray", "local"):
        over = {**base, "run.name": engine, "run.engine": engine, "distill.mix": "cutmix", "distill.extra_banks": f"[{crops}]"}
        cfg = load_config(None, tiny_run_args(tmp_path / engine, tiny_assets, cifar10_decoded, over)).with_absolute_paths()
        prepare_run_dir(cfg)
        (run_ray if engine == "ray" else run_local)(cfg, **({} if engine == "ray" else {"progress": False}))
        metrics[engine] = read_jsonl(cfg.run_dir / "metrics.jsonl")[0]
        if engine == "ray":
            ids = [i for b in read_jsonl(cfg.run_dir / "stream" / "train-rank0-epoch0.jsonl") for i in b["ids"]]
            assert any(i.startswith("crop-") for i in ids) and any(not i.startswith("crop-") for i in ids)
    assert metrics["local"]["pool_rows"] == 2 * 16 + 24
    for k in ("test_acc", "test_loss", "loss_kd", "loss_ce", "loss_fea", "rows"):
        assert metrics["ray"][k] == pytest.approx(metrics["local"][k], rel=1e-5, abs=1e-6), k


def test_dda_metrics_have_the_same_names_and_values_on_both_engines(tmp_path, tiny_assets, cifar10_decoded, ray_cluster):
    """One run driver: in dda mode both engines report the epoch pool's augment/filter totals (the
    local engine's in-memory pool, the Ray engine's stream) under the same names, with the same
    values for the same seed, and train on the same batches."""
    from dda_ray.engines.local import run_local
    from dda_ray.engines.ray_train import run_ray

    metrics = {}
    for engine in ("ray", "local"):
        cfg = ray_config(tmp_path / engine, tiny_assets, cifar10_decoded, **{"run.name": engine, "run.engine": engine, "synthesis.init_rounds": 2}).with_absolute_paths()
        (run_ray if engine == "ray" else run_local)(cfg, **({} if engine == "ray" else {"progress": False}))
        metrics[engine] = read_jsonl(cfg.run_dir / "metrics.jsonl")
    keys = ("kept_fraction", "variations", "kept", "rejected", "augment_diffused", "pool_rows", "next_round")
    for ray_epoch, local_epoch in zip(metrics["ray"], metrics["local"], strict=True):
        # cache lookups (the stream looks a parent up per batch) and timings are named alike, valued per engine
        assert set(ray_epoch) == set(local_epoch)
        for k in keys:
            assert ray_epoch[k] == local_epoch[k], (ray_epoch["epoch"], k)
        for k in ("test_acc", "loss_kd", "rows", "steps"):
            assert ray_epoch[k] == pytest.approx(local_epoch[k], rel=1e-5, abs=1e-6), (ray_epoch["epoch"], k)
    assert [m["augment_diffused"] for m in metrics["local"]] == [16 * 3, 16]  # the bank and the first round, then the new round


# ------------------------------------------------ Ray API use (no cluster started)
RAY_DATA_CALLS = ("map_batches", "read_datasource")


def test_ray_data_calls_use_only_named_parameters():
    """Every map_batches / read_datasource call in the package and the benchmarks names only
    parameters of Ray's own signature: extra keywords land in ``**ray_remote_args``, deprecated in
    Ray 2.60 (a RayDeprecationWarning on every run; removed in 2.64)."""
    import ast
    import inspect

    import ray.data

    named = {
        "map_batches": set(inspect.signature(ray.data.Dataset.map_batches).parameters) - {"self", "ray_remote_args"},
        "read_datasource": set(inspect.signature(ray.data.read_datasource).parameters) - {"ray_remote_args", "read_args"},
    }
    root = Path(__file__).resolve().parents[2]
    found = 0
    for path in [*sorted((root / "dda_ray").rglob("*.py")), *sorted((root / "benchmarks").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RAY_DATA_CALLS:
                found += 1
                where = f"{path.relative_to(root)}:{node.lineno}"
                assert all(k.arg is not None for k in node.keywords), f"{where}: **kwargs reach ray_remote_args"
                extra = {k.arg for k in node.keywords} - named[node.func.attr]
                assert not extra, f"{where}: {sorted(extra)} are not named parameters of {node.func.attr}"
    assert found >= 4  # the augment, filter and pool stages, and the benchmark's augment pool


def test_actor_pools_restart_dead_actors_by_default():
    """What build_dataset relies on without passing it (see dda_ray/engines/ray_train.py): a dead augment or
    filter actor is restarted and its unfinished batches retried, without limit."""
    from ray.data import DataContext
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    args = ActorPoolMapOperator._apply_default_remote_args({}, DataContext())
    assert args["max_restarts"] == -1 and args["max_task_retries"] == -1


def test_a_path_another_node_cannot_see_stops_a_multi_node_run_before_work(ray_cluster, tmp_path, monkeypatch):
    """The shared-disk check (dda_ray/engines/shared_disk.py): a probe written here is read back by a task
    on each other node. Here the one node is named explicitly, so its task is another process: a
    real path passes (the probe is gone after), and /proc/self/cwd/out -- one path that names
    another folder in every process, as a node-local disk mounted at the same path on each node
    does -- stops with one error naming the field, the path and the node."""
    import ray

    from dda_ray.engines.shared_disk import SharedDiskError, check_shared_paths

    me = [n for n in ray.nodes() if n["NodeID"] == ray.get_runtime_context().get_node_id()]
    shared = tmp_path / "out"
    assert check_shared_paths({"run.output_dir": shared}, nodes=me) == [me[0]["NodeManagerAddress"]]
    assert list(shared.iterdir()) == []  # the probe is removed
    assert check_shared_paths({"run.output_dir": shared}) == []  # a cluster of one node: nothing to check
    private = tmp_path / "driver-cwd"
    private.mkdir()
    monkeypatch.chdir(private)  # the Ray workers started in another directory
    with pytest.raises(SharedDiskError) as e:
        check_shared_paths({"run.output_dir": Path("/proc/self/cwd/out")}, nodes=me)
    msg = str(e.value)
    assert msg.startswith("run.output_dir = /proc/self/cwd/out written on the driver's node is not visible from node " + me[0]["NodeManagerAddress"])
    assert "shared file system" in msg and "\n" not in msg
    assert list((private / "out").iterdir()) == []
