"""End-to-end runs of the single-process pipeline on the real CIFAR-10 test split (tiny budgets)."""

import json
import math

import pytest

from dda_ray.config import load_config
from dda_ray.data.bank import bank_files, read_bank
from dda_ray.engines.local import run_local
from dda_ray.models.checkpoint import load_classifier, save_classifier
from dda_ray.runtime import prepare_run_dir, read_jsonl

from .._helpers import teacher_with_stats, tiny_config


def test_inversion_run_writes_bank_rounds_metrics_and_student(tmp_path, tiny_teacher, cifar10_decoded):
    cfg = tiny_config(tmp_path, tiny_teacher, cifar10_decoded)
    final = run_local(cfg, progress=False)
    run_dir = cfg.run_dir
    assert (run_dir / "config.yaml").exists()
    assert len(bank_files(run_dir / "bank")) == 2
    assert len(bank_files(run_dir / "rounds")) == 2  # one round with the student per epoch
    assert len(read_bank(run_dir / "rounds")) == 32
    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in lines] == [1, 2]
    assert all(m["steps"] == 3 and m["rows"] == 48 for m in lines)
    assert lines[0]["pool_rows"] == 48 and lines[1]["pool_rows"] == 64  # bank grows by a round per epoch
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["test_acc"] == final["test_acc"] and 0 <= final["test_acc"] <= 100
    student, meta = load_classifier(run_dir / "student", "wrn16_1", 10)
    assert meta["mode"] == "inversion" and meta["accuracy"] == final["test_acc"]


def test_fixed_seed_reproduces_metrics(tmp_path, tiny_teacher, cifar10_decoded):
    a = run_local(tiny_config(tmp_path / "a", tiny_teacher, cifar10_decoded, **{"distill.epochs": 1}), progress=False)
    b = run_local(tiny_config(tmp_path / "b", tiny_teacher, cifar10_decoded, **{"distill.epochs": 1}), progress=False)
    for k in ("test_acc", "test_loss", "loss_kd", "loss_ce", "loss_fea"):
        assert a[k] == b[k], k
    c = run_local(tiny_config(tmp_path / "c", tiny_teacher, cifar10_decoded, **{"distill.epochs": 1, "run.seed": 1}), progress=False)
    assert c["loss_kd"] != a["loss_kd"]


def test_real_kd_uses_the_same_loop_and_budget(tmp_path, tiny_teacher, cifar10_decoded):
    cfg = tiny_config(tmp_path, tiny_teacher, cifar10_decoded, **{"run.mode": "real_kd", "data.train_subset": 64})
    final = run_local(cfg, progress=False)
    assert final["steps"] == 3 and final["rows"] == 48 and final["pool_rows"] == 64
    assert not (cfg.run_dir / "bank").exists()  # no synthesis in real_kd


def test_one_pass_epochs_train_every_row_once(tmp_path, tiny_teacher, cifar10_decoded):
    cfg = tiny_config(tmp_path, tiny_teacher, cifar10_decoded, **{"distill.steps_per_epoch": "null", "distill.epochs": 1})
    final = run_local(cfg, progress=False)
    assert final["rows"] == 48 and final["steps"] == 3  # 2 initial rounds + 1 student round, 16 rows each


def test_shared_initial_bank_is_reused(tmp_path, tiny_teacher, cifar10_decoded):
    shared = tmp_path / "shared_bank"
    a = tiny_config(tmp_path / "a", tiny_teacher, cifar10_decoded, **{"synthesis.bank_dir": str(shared), "distill.epochs": 1})
    run_local(a, progress=False)
    stamp = [p.stat().st_mtime_ns for p in bank_files(shared)]
    b = tiny_config(tmp_path / "b", tiny_teacher, cifar10_decoded, **{"synthesis.bank_dir": str(shared), "distill.epochs": 1})
    run_local(b, progress=False)
    assert [p.stat().st_mtime_ns for p in bank_files(shared)] == stamp  # not re-synthesised
    assert not (b.run_dir / "bank").exists()


def test_resume_continues_after_the_last_epoch_and_extends_the_schedule(tmp_path, tiny_teacher, cifar10_decoded):
    first = tiny_config(tmp_path, tiny_teacher, cifar10_decoded, **{"distill.epochs": 1})
    run_local(first, progress=False)
    resumed = load_config(None, [f"{k}={v}" for k, v in {**_overrides(first), "distill.epochs": 2, "run.resume": True}.items()])
    prepare_run_dir(resumed)  # allowed: run.resume=true
    final = run_local(resumed, progress=False)
    lines = read_jsonl(first.run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in lines] == [1, 2] and final["epoch"] == 2
    assert lines[1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 2)))  # epoch 2 of a 2-epoch cosine
    assert len(bank_files(first.run_dir / "rounds")) == 2  # the round of epoch 1 is reused, one new


class _Cut(Exception):
    pass


@pytest.mark.parametrize("state_left", [True, False], ids=["after-its-checkpoint", "before-any-checkpoint"])
def test_an_attempt_restarted_by_its_engine_resumes_from_the_run_directory_and_repeats_the_uninterrupted_run(tmp_path, tiny_teacher, cifar10_decoded, state_left):
    """Ray Train restarts a lost worker with its own checkpoint, which the driver reports *after*
    writing state.pt: a worker lost between the two finds no Ray checkpoint. An engine that
    ``resumes_run_dir`` then resumes from state.pt without run.resume (cut before any state.pt: it
    starts again, the cut attempt's metrics lines and rounds dropped): each epoch once, as uninterrupted."""
    from dda_ray.distill.driver import drive
    from dda_ray.engines.local import LocalEngine

    whole = tiny_config(tmp_path / "whole", tiny_teacher, cifar10_decoded)
    run_local(whole, progress=False)

    class CutAfterFirstEpoch(LocalEngine):
        def report(self, metrics, epoch, save_state):
            raise _Cut  # the worker is lost after the driver wrote the epoch (line, rounds, state.pt)

    class Restarted(LocalEngine):
        resumes_run_dir = True

    cut = tiny_config(tmp_path / "cut", tiny_teacher, cifar10_decoded)
    with pytest.raises(_Cut):
        drive(cut, CutAfterFirstEpoch(progress=False))
    assert [m["epoch"] for m in read_jsonl(cut.run_dir / "metrics.jsonl")] == [1]
    if not state_left:
        (cut.run_dir / "state.pt").unlink()
    assert not cut.run.resume
    drive(cut, Restarted(progress=False))
    a, b = read_jsonl(whole.run_dir / "metrics.jsonl"), read_jsonl(cut.run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in b] == [1, 2]
    for k in ("test_acc", "loss_kd", "rows"):
        assert [m[k] for m in a] == [m[k] for m in b], k
    assert (read_bank(whole.run_dir / "rounds").images == read_bank(cut.run_dir / "rounds").images).all()
    sa, sb = load_classifier(whole.run_dir / "student", "wrn16_1", 10)[0], load_classifier(cut.run_dir / "student", "wrn16_1", 10)[0]
    assert all((x == y).all() for x, y in zip(sa.state_dict().values(), sb.state_dict().values(), strict=True))


def _overrides(cfg) -> dict:
    return {k: ("null" if v is None else v) for k, v in cfg.flat().items() if not isinstance(v, (list, dict))}


def test_shared_bank_is_reused_only_with_the_same_teacher_and_settings(tmp_path, tiny_teacher, cifar10_decoded):
    from dda_ray.data.bank import BankError, read_provenance

    shared = tmp_path / "shared_bank"
    first = tiny_config(tmp_path / "a", tiny_teacher, cifar10_decoded, **{"distill.epochs": 1, "synthesis.bank_dir": shared})
    run_local(first, progress=False)
    files = bank_files(shared)
    assert len(files) == 2 and read_provenance(files[0])["teacher"]
    stamps = [f.stat().st_mtime_ns for f in files]
    run_local(
        tiny_config(tmp_path / "b", tiny_teacher, cifar10_decoded, **{"distill.epochs": 1, "synthesis.bank_dir": shared}), progress=False
    )
    assert [f.stat().st_mtime_ns for f in bank_files(shared)] == stamps  # reused, not re-synthesised

    other = tmp_path / "other_teacher"
    save_classifier(teacher_with_stats(seed=1), other, arch="wrn16_1", num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    with pytest.raises(BankError, match=r"teacher: bank has '[0-9a-f]{16}', this run has '[0-9a-f]{16}'"):
        run_local(tiny_config(tmp_path / "c", other, cifar10_decoded, **{"synthesis.bank_dir": shared}), progress=False)
    with pytest.raises(BankError, match=r"synthesis: bank has '.*g_steps=3.*', this run has '.*g_steps=5"):
        run_local(
            tiny_config(tmp_path / "d", tiny_teacher, cifar10_decoded, **{"synthesis.bank_dir": shared, "synthesis.init_g_steps": 5}),
            progress=False,
        )


FAST = {"synthesis.method": "fast", "synthesis.init_g_steps": 2, "synthesis.g_steps": 2}
CMI = {"synthesis.method": "cmi", "synthesis.cr": 0.8, "synthesis.cmi_negatives": 32, "synthesis.init_g_steps": 2, "synthesis.g_steps": 2}


@pytest.mark.parametrize("chain", [FAST, CMI], ids=["fast", "cmi"])
def test_chained_bank_is_one_chain_that_resumes_exactly_and_records_its_method(tmp_path, tiny_teacher, cifar10_decoded, chain):
    from dda_ray.data.bank import read_provenance
    from dda_ray.models.checkpoint import load_teacher
    from dda_ray.synthesis.initial_bank import SYNTHESIS_STATE, build_initial_bank
    from dda_ray.synthesis.synthesizer import build_synthesizer

    def bank(name, rounds_in_steps):
        for n in rounds_in_steps:  # a bank built in pieces = an interrupted then resumed bank
            cfg = tiny_config(tmp_path / f"{name}{n}", tiny_teacher, cifar10_decoded, **chain, **{"synthesis.init_rounds": n, "synthesis.bank_dir": str(tmp_path / name)})
            teacher, normalize, _ = load_teacher(cfg)
            synth = build_synthesizer(cfg, teacher, normalize)
            build_initial_bank(cfg, synth, progress=False)
        return read_bank(tmp_path / name), synth

    whole, synth_whole = bank("whole", [3])
    pieces, synth_pieces = bank("pieces", [1, 3])
    assert whole.ids.tolist() == pieces.ids.tolist()
    assert (whole.images == pieces.images).all()  # round 2 continued the saved chain exactly
    assert synth_whole.rounds_done == synth_pieces.rounds_done == 3
    assert (tmp_path / "whole" / SYNTHESIS_STATE).exists()
    assert read_provenance(bank_files(tmp_path / "whole")[0])["method"] == chain["synthesis.method"]
    # a dda run cannot take a chained method's bank for its own (other settings)
    from dda_ray.data.bank import BankError

    cfg = tiny_config(tmp_path / "dda", tiny_teacher, cifar10_decoded, **{"synthesis.init_rounds": 3, "synthesis.bank_dir": str(tmp_path / "whole")})
    teacher, normalize, _ = load_teacher(cfg)
    with pytest.raises(BankError, match="method"):
        build_initial_bank(cfg, build_synthesizer(cfg, teacher, normalize), progress=False)


@pytest.mark.parametrize("chain", [FAST, CMI], ids=["fast", "cmi"])
def test_chained_run_resumes_its_chain_and_repeats_the_uninterrupted_run(tmp_path, tiny_teacher, cifar10_decoded, chain):
    """Rounds with the student continue a chain (fast: the meta-generator; cmi: its projection head
    and memory bank, started afresh after the bank); a resumed run restores it from the checkpoint,
    so its rounds and metrics equal an uninterrupted run's."""
    common = {**chain, "synthesis.adv": 1.0}
    whole = tiny_config(tmp_path / "whole", tiny_teacher, cifar10_decoded, **common)
    run_local(whole, progress=False)
    first = tiny_config(tmp_path / "split", tiny_teacher, cifar10_decoded, **common, **{"distill.epochs": 1})
    run_local(first, progress=False)
    resumed = load_config(None, [f"{k}={v}" for k, v in {**_overrides(first), "distill.epochs": 2, "run.resume": True}.items()])
    prepare_run_dir(resumed)
    run_local(resumed, progress=False)
    a, b = read_jsonl(whole.run_dir / "metrics.jsonl"), read_jsonl(first.run_dir / "metrics.jsonl")
    for k in ("test_acc", "loss_kd", "rows"):
        assert [m[k] for m in a] == [m[k] for m in b], k
    ra, rb = read_bank(whole.run_dir / "rounds"), read_bank(first.run_dir / "rounds")
    assert (ra.images == rb.images).all()  # the second round came from the restored chain


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def backend_pipelines(tmp_path_factory):
    """The three augmentation backends' tiny pipelines at the CIFAR size (32 px, 10 classes)."""
    from .._tiny_pipelines import build_backend_pipelines

    return build_backend_pipelines(tmp_path_factory.mktemp("backends"), num_classes=10, image_size=32)


@pytest.mark.parametrize("backend", ["local_prior", "sd_img2img", "sd_image_variations"])
def test_every_augmentation_backend_runs_on_the_local_engine(tmp_path, backend_pipelines, cifar10_decoded, monkeypatch, backend):
    """The local engine builds the augment stage as the Ray engine does, with the teacher's class
    names (sd_img2img prompts need them), and reports the epoch's augment/filter totals under the
    Ray engine's metric names."""
    from .._tiny_pipelines import offline, single_thread

    offline(monkeypatch)
    teacher = tmp_path / "teacher"  # a teacher whose meta.json names its classes, as train_teacher writes it
    save_classifier(teacher_with_stats(), teacher, arch="wrn16_1", num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), classes=CIFAR10_CLASSES)
    overrides = {
        "run.mode": "dda",
        "synthesis.init_rounds": 1,
        "synthesis.init_batch_size": 4,
        "synthesis.init_g_steps": 1,
        "synthesis.rounds_per_epoch": 0,
        "distill.epochs": 1,
        "distill.steps_per_epoch": 1,
        "distill.batch_size": 4,
        "data.eval_subset": 20,
        "augment.backend": backend,
        "augment.model": str(backend_pipelines[backend]),
        "augment.num_variations": 1,
        "augment.steps": 2,
        "augment.strength": 0.5,
        "augment.cache_dir": str(tmp_path / "cache"),
        "filter.threshold": 0.0,
    }
    cfg = tiny_config(tmp_path / "run", teacher, cifar10_decoded, **overrides)
    prompts = []
    if backend == "sd_img2img":
        from diffusers import StableDiffusionImg2ImgPipeline

        encode = StableDiffusionImg2ImgPipeline.encode_prompt
        monkeypatch.setattr(StableDiffusionImg2ImgPipeline, "encode_prompt", lambda self, prompt, *a, **k: prompts.append(prompt) or encode(self, prompt, *a, **k))
    with single_thread():
        run_local(cfg, progress=False)
    (m,) = read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert m["variations"] == 4 == m["kept"] + m["rejected"] and m["augment_diffused"] == 4 and m["augment_cache_hits"] == 0
    assert m["kept_fraction"] == m["kept"] / 4 and m["pool_rows"] == 4 + m["kept"]
    assert m["synthesis_s"] >= 0 and m["bank_s"] >= 0
    if backend == "sd_img2img":
        assert prompts and all(p.split()[-1] in CIFAR10_CLASSES for p in prompts)
