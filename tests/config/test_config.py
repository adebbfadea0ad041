"""Typed configuration: YAML, dotted overrides, validation messages, run directories."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dda_ray.config import Config, ConfigError, config_from_dict, load_config, parse_override, to_raw
from dda_ray.runtime import RunDirExistsError, prepare_run_dir

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((ROOT / "configs").rglob("*.yaml"))


def test_defaults_validate():
    cfg = Config()
    assert cfg.validate() is cfg
    assert load_config() == cfg
    assert cfg.run_dir == Path(cfg.run.output_dir) / cfg.run.name


def test_yaml_file_sets_fields_and_keeps_other_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "exp1", "mode": "inversion"},
                "distill": {"epochs": 5, "lr": 0.05},
                "augment": {"strength": 0.7},
                "data": {"eval_subset": 100},
                "tune": {"num_samples": 4},
            }
        )
    )
    cfg = load_config(path)
    assert cfg.run.name == "exp1" and cfg.run.mode == "inversion"
    assert cfg.distill.epochs == 5 and cfg.distill.lr == 0.05
    assert cfg.augment.strength == 0.7
    assert cfg.data.eval_subset == 100
    assert cfg.tune.num_samples == 4 and cfg.tune == dataclasses.replace(Config().tune, num_samples=4)
    default = Config()
    assert cfg.distill.batch_size == default.distill.batch_size
    assert cfg.augment.backend == default.augment.backend
    assert cfg.teacher == default.teacher


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_dotted_overrides_on_top_of_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  eval_subset: 500\ndistill:\n  epochs: 9\n")
    cfg = load_config(path, ["distill.epochs=3", "augment.strength=0.5", "data.eval_subset=null"])
    assert cfg.distill.epochs == 3 and type(cfg.distill.epochs) is int
    assert cfg.augment.strength == 0.5 and type(cfg.augment.strength) is float
    assert cfg.data.eval_subset is None


def test_override_coerces_int_to_float_and_parses_yaml_values():
    cfg = load_config(None, ["augment.strength=1", "run.resume=true", "teacher.checkpoint=null", "run.name=abc"])
    assert cfg.augment.strength == 1.0 and type(cfg.augment.strength) is float
    assert cfg.run.resume is True
    assert cfg.teacher.checkpoint is None
    assert cfg.run.name == "abc"
    # YAML 1.1 reads 5e-3 (no dot) as a string: a float field takes it as the number it spells
    assert load_config(None, ["synthesis.lr_g=5e-3"]).synthesis.lr_g == 0.005
    with pytest.raises(ConfigError, match="synthesis.lr_g"):
        load_config(None, ["synthesis.lr_g=fast"])


def test_parse_override():
    assert parse_override("distill.epochs=3") == (["distill", "epochs"], 3)
    assert parse_override("--augment.strength=0.5") == (["augment", "strength"], 0.5)
    assert parse_override("data.eval_subset=null") == (["data", "eval_subset"], None)
    assert parse_override("run.name=") == (["run", "name"], "")


@pytest.mark.parametrize("text", ["distill.epochs", "=3", "distill..epochs=3", "a.b=[unclosed"])
def test_malformed_override_raises(text):
    with pytest.raises(ConfigError):
        load_config(None, [text])


@pytest.mark.parametrize(
    "override, field, shown",
    [
        ("augment.strength=0", "augment.strength", "0.0"),
        ("augment.strength=1.5", "augment.strength", "1.5"),
        ("filter.threshold=1.5", "filter.threshold", "1.5"),
        ("filter.threshold=-2", "filter.threshold", "-2.0"),
        ("distill.epochs=-1", "distill.epochs", "-1"),
        ("distill.epochs=0", "distill.epochs", "0"),
        ("teacher.arch=resnet999", "teacher.arch", "'resnet999'"),
        ("student.arch=not_a_net", "student.arch", "'not_a_net'"),
        ("augment.backend=dalle", "augment.backend", "'dalle'"),
        ("run.mode=magic", "run.mode", "'magic'"),
        ("distill.amp=fp8", "distill.amp", "'fp8'"),
        ("synthesis.rotation_views=5", "synthesis.rotation_views", "5"),
        ("synthesis.rotation_views=0", "synthesis.rotation_views", "0"),
        ("data.dataset=mnist", "data.dataset", "'mnist'"),
        ("data.num_classes=1", "data.num_classes", "1"),
        ("resources.augment_actors=0", "resources.augment_actors", "0"),
        ("augment.dtype=int8", "augment.dtype", "'int8'"),
        ("run.name=a/b", "run.name", "'a/b'"),
        ("resources.augment_resources={GPU: 1}", "resources.augment_resources", "'GPU'"),
        ("resources.worker_resources.train=-1", "resources.worker_resources.train", "-1"),
        ("resources.filter_resources={x: big}", "resources.filter_resources.x", "'big'"),
        ("tracking.register_as=' '", "tracking.register_as", "' '"),
    ],
)
def test_out_of_range_value_names_field_and_value(override, field, shown):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    msg = str(exc.value)
    assert f"{field} = {shown}" in msg, msg
    assert "expected" in msg


def test_strength_message_says_what_one_means_for_the_backend():
    with pytest.raises(ConfigError, match=r"1 is the stock image-variation pipeline from pure noise, the paper's setting"):
        load_config(None, ["augment.backend=sd_image_variations", "augment.strength=1.5"])
    for backend in ("local_prior", "sd_img2img"):
        with pytest.raises(ConfigError, match=r"SDEdit img2img; 1 is the maximum"):
            load_config(None, [f"augment.backend={backend}", "augment.strength=0"])


def test_boundary_values_are_accepted():
    cfg = load_config(None, ["augment.strength=1", "filter.threshold=-1", "distill.epochs=1", "teacher.arch=pkg.mod:factory"])
    assert cfg.augment.strength == 1.0 and cfg.filter.threshold == -1.0
    assert cfg.teacher.arch == "pkg.mod:factory"


def test_unknown_section_raises():
    with pytest.raises(ConfigError, match="unknown config section") as exc:
        load_config(None, ["nosuch.field=1"])
    assert "nosuch" in str(exc.value)


def test_unknown_field_raises(tmp_path):
    with pytest.raises(ConfigError, match="distill.epoch_count"):
        load_config(None, ["distill.epoch_count=3"])
    path = tmp_path / "c.yaml"
    path.write_text("augment:\n  strenght: 0.3\n")
    with pytest.raises(ConfigError, match="augment.strenght"):
        load_config(path)


@pytest.mark.parametrize(
    "override, field",
    [
        ("augment.strength=abc", "augment.strength"),
        ("augment.strength=true", "augment.strength"),
        ("distill.epochs=2.5", "distill.epochs"),
        ("distill.epochs=ten", "distill.epochs"),
        ("run.resume=3", "run.resume"),
        ("run.name=[1, 2]", "run.name"),
        ("distill.lr=.inf", "distill.lr"),
        ("distill.epochs=null", "distill.epochs"),
    ],
)
def test_wrong_type_raises(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("value", [[1, 2], 3, "text"])
def test_section_that_is_not_a_mapping_raises(value):
    with pytest.raises(ConfigError, match="distill"):
        config_from_dict({"distill": value})


def test_section_that_is_not_a_mapping_raises_from_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill: 3\n")
    with pytest.raises(ConfigError, match="distill"):
        load_config(path)
    with pytest.raises(ConfigError, match="distill"):
        load_config(None, ["distill=3"])
    with pytest.raises(ConfigError, match="distill"):
        load_config(None, ["distill=3", "distill.epochs=2"])
    with pytest.raises(ConfigError, match="tune"):
        load_config(None, ["tune=5"])


def test_empty_section_keeps_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\naugment: {}\n")
    assert load_config(path) == Config()


def test_bad_files_raise(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_flat_keys():
    cfg = Config()
    flat = cfg.flat()
    sections = [f.name for f in dataclasses.fields(cfg) if f.name != "tune"]  # tune: the search's settings, not a run's
    expected = {f"{s}.{f.name}" for s in sections for f in dataclasses.fields(getattr(cfg, s))}
    assert set(flat) == expected
    assert not any(k.startswith("tune") for k in flat)
    assert flat["augment.strength"] == cfg.augment.strength
    assert flat["distill.epochs"] == cfg.distill.epochs
    assert flat["teacher.arch"] is None and flat["student.arch"] == "wrn16_1"  # teacher: the arch its meta.json names
    assert flat["data.eval_subset"] is None


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["distill.epochs=3", "augment.strength=0.5", "tune.metric=test_loss", "tune.space.distill.lr={loguniform: [0.01, 0.1]}", "run.name=rt"])
    path = tmp_path / "saved.yaml"
    cfg.save(path)
    assert load_config(path) == cfg


def test_config_presets_exist():
    assert CONFIG_FILES, "configs/*.yaml is empty"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_presets_load_and_validate(path):
    cfg = load_config(path)
    assert cfg.validate() is cfg
    raw = yaml.safe_load(path.read_text()) or {}
    # every value written in the preset made it into the config
    for section, values in raw.items():
        if section == "tune":
            assert to_raw(cfg.tune) == {**to_raw(Config().tune), **values}
            continue
        for key, value in (values or {}).items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_preset_tracks_and_takes_the_teacher_arch_from_its_checkpoint(path):
    """README: every job logs to MLflow. A preset whose teacher is a project checkpoint (with its
    meta.json) leaves the architecture to it, so pointing teacher.checkpoint at another project
    checkpoint needs no other change; a teacher trained by the preset, or a community checkpoint
    (no meta.json), names it."""
    from dda_ray.models.checkpoint import read_meta, resolved_teacher_arch

    cfg = load_config(path)
    assert cfg.tracking.enabled
    ckpt = cfg.teacher.checkpoint
    if ckpt and (ROOT / ckpt).is_dir() and read_meta(ROOT / ckpt):
        assert cfg.teacher.arch is None, f"{path.name}: teacher.arch pinned although {ckpt}/meta.json names it"
        assert resolved_teacher_arch(load_config(path, [f"teacher.checkpoint={ROOT / ckpt}"])) == read_meta(ROOT / ckpt)["arch"]
    elif ckpt is None:
        assert cfg.teacher.arch, f"{path.name} trains a teacher: it must name the architecture"


PAPER_PRESETS = [p for p in CONFIG_FILES if p.parent.name == "paper"]


@pytest.mark.parametrize("path", PAPER_PRESETS, ids=[p.name for p in PAPER_PRESETS])
def test_paper_presets_use_the_papers_augmentation(path):
    """The paper varies each image with Lambda's image-variations model: stock pipeline (strength 1), guidance 3, 25 steps."""
    a = load_config(path).augment
    assert (a.backend, a.model) == ("sd_image_variations", "lambdalabs/sd-image-variations-diffusers")
    assert (a.strength, a.guidance, a.steps) == (1.0, 3.0, 25)


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run.output_dir={tmp_path / 'out'}", "run.name=r1", *extra])


def test_prepare_run_dir_writes_config(tmp_path):
    cfg = _cfg(tmp_path, "distill.epochs=4")
    run_dir = prepare_run_dir(cfg)
    assert run_dir == tmp_path / "out" / "r1"
    assert load_config(run_dir / "config.yaml") == cfg


def test_prepare_run_dir_reuses_an_empty_dir(tmp_path):
    (tmp_path / "out" / "r1").mkdir(parents=True)
    assert (prepare_run_dir(_cfg(tmp_path)) / "config.yaml").is_file()


def test_prepare_run_dir_refuses_an_existing_run_unless_resuming(tmp_path):
    prepare_run_dir(_cfg(tmp_path, "distill.epochs=4"))
    (tmp_path / "out" / "r1" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirExistsError, match="run.resume=true") as exc:
        prepare_run_dir(_cfg(tmp_path, "distill.epochs=5"))
    assert str(tmp_path / "out" / "r1") in str(exc.value)
    # refused: nothing of the earlier run was touched
    assert load_config(tmp_path / "out" / "r1" / "config.yaml").distill.epochs == 4
    resumed = _cfg(tmp_path, "distill.epochs=5", "run.resume=true")
    prepare_run_dir(resumed)
    assert load_config(tmp_path / "out" / "r1" / "config.yaml") == resumed
    assert (tmp_path / "out" / "r1" / "metrics.jsonl").read_text() == "{}\n"
