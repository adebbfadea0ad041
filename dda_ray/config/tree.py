"""Typed configuration for every stage, loaded from YAML with dotted CLI overrides.

One tree serves every job (teacher training, prior training, distillation, tuning): each job
reads the sections it needs. Overrides use one convention everywhere: ``section.field=value``
(the value is parsed as YAML, so ``augment.strength=0.3`` is a float and
``data.subset=null`` is None). Validation runs before any work and stops with a single
:class:`ConfigError` naming the field, the value and the allowed range.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .sections import (
    ADV_TERMS,
    ARCHITECTURE_NAMES,
    AUGMENT_BACKENDS,
    DATASETS,
    DTYPES,
    MIX_MODES,
    MODES,
    PRIOR_LABELS,
    PRIOR_SOURCES,
    SYNTHESIS_METHODS,
    AugmentConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    FilterConfig,
    ModelConfig,
    ResourcesConfig,
    RunConfig,
    SynthesisConfig,
    TeacherConfig,
    TeacherTrainingConfig,
    TrackingConfig,
)
from .space import TUNABLE_SECTIONS, Domain, TuneConfig

__all__ = [  # the sections are defined in sections.py / space.py; the package re-exports all of these
    "ADV_TERMS", "ARCHITECTURE_NAMES", "AUGMENT_BACKENDS", "DATASETS", "DTYPES", "MIX_MODES", "MODES", "PRIOR_LABELS", "PRIOR_SOURCES", "SYNTHESIS_METHODS",
    "AugmentConfig", "Config", "ConfigError", "DataConfig", "DistillConfig", "Domain", "FilterConfig", "ModelConfig",
    "ResourcesConfig", "RunConfig", "SynthesisConfig", "TeacherConfig", "TeacherTrainingConfig", "TrackingConfig", "TuneConfig",
    "apply_overrides", "apply_values", "check_tune_space", "config_from_dict", "config_reference", "load_config", "parse_override", "plain_value", "to_raw",
]  # fmt: skip


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(arch="wrn16_1"))
    teacher_training: TeacherTrainingConfig = field(default_factory=TeacherTrainingConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)  # search space and scheduler (jobs/tune.py)

    def __post_init__(self) -> None:
        self.resolve()

    def resolve(self) -> Config:
        """Fill the method-dependent fields a config left null: the synthesis weights of
        ``synthesis.method`` and the KD loss terms of the method that makes the rows."""
        self.synthesis.resolve()
        self.distill.resolve(self.run.mode, self.synthesis.method)
        return self

    def validate(self, check_space: bool = True) -> Config:
        """Every section's own checks, then those across sections (``check_space``: the tune space against the rest)."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        self.resolve()
        if self.distill.extra_banks and self.run.mode == "real_kd":
            raise ConfigError("distill.extra_banks adds rows to the synthetic pool; run.mode = 'real_kd' trains on the real split only (use inversion or dda)")
        if self.tune.train_in == "trial" and self.resources.num_workers > 1:
            raise ConfigError(
                f"tune.train_in = 'trial' runs each trial's KD loop in the trial's own process (one worker), but resources.num_workers = "
                f"{self.resources.num_workers}; set tune.train_in=ray_train (or auto) for a TorchTrainer with that many workers per trial"
            )
        if check_space:
            check_tune_space(self)
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict:
        """Plain YAML-ready values (what :func:`config_from_dict` reads back)."""
        return to_raw(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"augment.strength": 0.3, ...}`` (every section but ``tune``): for MLflow params and Tune spaces."""
        out: dict[str, Any] = {}
        for sec, values in self.to_dict().items():
            if isinstance(values, dict) and sec != "tune":
                for k, v in values.items():
                    out[f"{sec}.{k}"] = v
        return out

    def with_absolute_paths(self) -> Config:
        """A copy whose local paths are absolute: Ray workers and actors may run in other directories."""
        cfg = copy.deepcopy(self)

        def absolute(p: str | None) -> str | None:
            return str(Path(p).expanduser().resolve()) if p and Path(p).expanduser().exists() else p

        cfg.run.output_dir = str(Path(cfg.run.output_dir).expanduser().resolve())
        cfg.data.path = absolute(cfg.data.path)
        cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
        cfg.teacher.checkpoint = absolute(cfg.teacher.checkpoint)
        cfg.augment.model = absolute(cfg.augment.model)
        cfg.synthesis.bank_dir = absolute(cfg.synthesis.bank_dir) if cfg.synthesis.bank_dir else None
        cfg.distill.extra_banks = [str(Path(d).expanduser().resolve()) for d in cfg.distill.extra_banks]
        if cfg.synthesis.bank_dir is None and self.synthesis.bank_dir:
            cfg.synthesis.bank_dir = str(Path(self.synthesis.bank_dir).expanduser().resolve())
        return cfg

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())


def to_raw(obj: Any) -> Any:
    """A config object as plain YAML values: sections become mappings, a :class:`Domain` its ``{kind: args}``."""
    if hasattr(obj, "to_raw"):
        return obj.to_raw()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_raw(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_raw(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_raw(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def plain_value(v: Any) -> Any:
    """numpy scalars (what Tune searchers may hand out) -> Python values the config accepts."""
    item = getattr(v, "item", None)
    return item() if callable(item) and not isinstance(v, (list, dict, str)) else v


def apply_values(cfg: Config, values: dict[str, Any], check_space: bool = True, **run: Any) -> Config:
    """A validated copy of ``cfg`` with dotted ``values`` (``{"augment.strength": 0.4}``) and ``run.*`` fields set."""
    raw = cfg.to_dict()
    for key, v in values.items():
        section, name = key.split(".", 1)
        raw[section][name] = plain_value(v)
    raw["run"].update(run)
    return config_from_dict(raw).validate(check_space=check_space)


def check_tune_space(cfg: Config, p: str = "tune") -> None:
    """Each key of ``cfg.tune.space`` is a field of a tunable section; every value a trial may get passes the
    config's validation."""
    flat = cfg.flat()
    for key, domain in cfg.tune.space.items():
        name = f"{p}.space.{key}"
        section = key.split(".", 1)[0]
        if key not in flat:
            examples = "e.g. augment.strength, augment.guidance, filter.threshold"
            raise ConfigError(f"{name}: unknown config field {key!r}; expected a 'section.field' of the config, {examples}")
        if section not in TUNABLE_SECTIONS:
            tunable = ", ".join(TUNABLE_SECTIONS)
            raise ConfigError(f"{name}: section {section!r} cannot be tuned (trials share it with the search); tunable sections: {tunable}")
        for v in domain.extremes():
            try:
                apply_values(cfg, {key: v}, check_space=False)
            except ConfigError as e:
                raise ConfigError(f"{name}: {domain.describe()} can produce {v!r}, which the config refuses: {e}") from None


# ----------------------------------------------------------------- reference
def _field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` of each field in ``cls``'s source: the one after the field, else the block right above it."""
    import inspect

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"\s+(\w+):\s*[^=]+=.*?(?:\s#\s*(.*))?$", line)
        if m and not stripped.startswith(("def ", "return", '"""')):
            trailing = (m.group(2) or "").strip()
            if trailing and not trailing.startswith(("noqa", "fmt:")):
                out[m.group(1)] = trailing
            elif above:
                out[m.group(1)] = " ".join(above)
        above = []
    return out


def _show(value: Any) -> str:
    """A default as it is written in YAML or an override."""
    value = to_raw(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _type_name(typ: Any) -> str:
    if isinstance(typ, type):
        return typ.__name__
    return re.sub(r"\b(?:typing|[a-z_]+(?:\.[a-z_]+)+)\.", "", str(typ))  # dict[str, dda_ray.config.space.Domain] -> dict[str, Domain]


def config_reference(width: int = 100) -> str:
    """Every config section and field with its type, default and comment (generated from the dataclasses): the jobs' ``--help`` epilog."""
    import textwrap

    default = Config()
    out = ["config fields (set with section.field=value; defaults shown):"]
    for f in dataclasses.fields(Config):
        section = getattr(default, f.name)
        cls = type(section)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        out += ["", f"{f.name}: {doc}" if doc else f"{f.name}:"]
        hints = get_type_hints(cls)
        comments = _field_comments(cls)
        for sub in dataclasses.fields(cls):
            out.append(f"  {f.name}.{sub.name} = {_show(getattr(section, sub.name))}  ({_type_name(hints[sub.name])})")
            if sub.name in comments:
                out += textwrap.wrap(comments[sub.name], width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(out)


# ----------------------------------------------------------------- building
def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Check/convert a YAML value to a field's annotated type."""
    origin = getattr(typ, "__origin__", None)
    args = getattr(typ, "__args__", ())
    if origin is None and args and type(None) in args:  # PEP 604 unions (X | None)
        pass
    if value is None:
        if args and type(None) in args:
            return None
        raise ConfigError(f"{name} = None is not allowed; expected a value of type {getattr(typ, '__name__', typ)}")
    if args and type(None) in args:
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} = {value!r} is not allowed; expected true or false")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} = {value!r} is not allowed; expected an integer")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} = {value!r} is not allowed; expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{name} = {value!r} is not allowed; expected a finite number")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} = {value!r} is not allowed; expected a string")
        return value
    if isinstance(typ, type) and hasattr(typ, "from_raw"):  # e.g. a tune Domain, written {uniform: [lo, hi]}
        return typ.from_raw(value, name)
    if typ is dict or getattr(typ, "__origin__", None) is dict:  # dict[str, X]: each value coerced to X
        if not isinstance(value, dict):
            raise ConfigError(f"{name} = {value!r} is not allowed; expected a mapping")
        item = typ.__args__[1] if getattr(typ, "__args__", ()) else None
        if item is None:
            return value
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(f"{name}: key {k!r} is not allowed; expected a string")
        return {k: _coerce(v, item, f"{name}.{k}") for k, v in value.items()}
    if getattr(typ, "__origin__", None) is list:  # list[int] etc.: each element coerced to the item type
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} = {value!r} is not allowed; expected a list")
        item = typ.__args__[0] if getattr(typ, "__args__", ()) else Any
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    return value


def _build_section(cls: type, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {values!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(f'{prefix}.{u}' for u in unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    hints = get_type_hints(Config)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; known: {sorted(hints)}")
    # each section's own defaults, before Config resolves the method-dependent ones: a config naming
    # another method gets that method's values, not those resolved for the default method
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, typ in hints.items():
        if name not in raw:
            continue
        if raw[name] is not None and not isinstance(raw[name], dict):
            raise ConfigError(f"{name} must be a mapping of fields, got {raw[name]!r}")
        base = to_raw(defaults[name])
        base.update(raw[name] or {})
        kwargs[name] = _build_section(typ, base, name)
    return Config(**kwargs)


def _override_path(path: list[str]) -> list[str]:
    """``tune.space.augment.strength`` -> ``[tune, space, augment.strength]``: below a mapping field
    (``dict[str, X]``) the rest of the dotted key is one key of that mapping."""
    typ: Any = Config
    for i, part in enumerate(path):
        if not dataclasses.is_dataclass(typ):
            break
        typ = get_type_hints(typ).get(part)
        if getattr(typ, "__origin__", None) is dict and i + 2 < len(path):
            return [*path[: i + 1], ".".join(path[i + 1 :])]
    return path


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, _, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for ov in overrides:
        path, value = parse_override(ov)
        path = _override_path(path)
        node = raw
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {p} is not a section")
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (or start from defaults), apply ``a.b=c`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw).validate()
