"""The ``tune`` section of the config tree: the Ray Tune search space, searcher and scheduler (jobs/tune.py).

It is loaded, overridden (``tune.searcher=random``, ``tune.space.augment.strength={uniform: [0.1, 0.5]}``)
and validated like every other section; each mistake is a :class:`ConfigError` naming the key. The
space maps dotted config fields to one distribution each::

    tune:
      space:
        augment.strength: {uniform: [0.1, 0.6]}
        augment.guidance: {choice: [1.0, 2.0, 3.0]}
        filter.threshold: {uniform: [0.5, 0.95]}

Beyond its own shape, the space is checked against the rest of the config (``check_tune_space`` in the config tree,
run by ``Config.validate``): each key is a field of a tunable section, and every value a trial may get
passes that field's own validation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .sections import ConfigError, _check

if TYPE_CHECKING:
    from .tree import Config

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice")
SEARCHERS = ("optuna", "random")
SCHEDULERS = ("asha", "fifo")
METRICS = ("test_acc", "test_loss")
TRAIN_IN = ("auto", "trial", "ray_train")
TUNABLE_SECTIONS = ("student", "synthesis", "augment", "filter", "distill")
DEFAULT_SPACE = {
    "augment.strength": {"uniform": [0.1, 0.6]},
    "augment.guidance": {"choice": [1.0, 2.0, 3.0]},
    "filter.threshold": {"uniform": [0.5, 0.95]},
}


@dataclass(frozen=True)
class Domain:
    """One dimension of the space, written ``{uniform: [lo, hi]}``, ``{choice: [a, b, ...]}``, ... in YAML."""

    kind: str  # one of DISTRIBUTIONS
    args: list  # uniform/loguniform: [low, high]; quniform: [low, high, q]; randint: [low, high); choice: the values

    @classmethod
    def from_raw(cls, value: Any, name: str) -> Domain:
        """``{kind: args}`` (YAML) -> a Domain; its arguments are checked by :meth:`validate`."""
        if isinstance(value, Domain):
            return value
        if not isinstance(value, dict) or len(value) != 1:
            examples = "e.g. {uniform: [0.1, 0.6]} or {choice: [1.0, 2.0]}"
            raise ConfigError(f"{name} = {value!r} is not allowed; expected one distribution, {examples}; distributions: {', '.join(DISTRIBUTIONS)}")
        ((kind, args),) = value.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{name}: unknown distribution {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"{name}.{kind} = {args!r} is not allowed; expected a list of arguments")
        return cls(kind, list(args))

    def to_raw(self) -> dict:
        return {self.kind: list(self.args)}

    def validate(self, name: str) -> None:
        kind, args = self.kind, self.args
        _check(kind in DISTRIBUTIONS, name, kind, f"one of {', '.join(DISTRIBUTIONS)}")
        p = f"{name}.{kind}"
        numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
        if kind in ("uniform", "loguniform"):
            _check(len(args) == 2 and numbers and args[0] < args[1], p, args, "[low, high] with low < high")
            _check(kind == "uniform" or args[0] > 0, p, args, "[low, high] with 0 < low < high")
        elif kind == "quniform":
            _check(len(args) == 3 and numbers and args[0] < args[1] and args[2] > 0, p, args, "[low, high, q] with low < high and q > 0")
        elif kind == "randint":
            integers = all(isinstance(a, int) and not isinstance(a, bool) for a in args)
            _check(len(args) == 2 and integers and args[0] < args[1], p, args, "[low, high) integers with low < high")
        else:
            _check(len(args) >= 1 and len(args) == len({json.dumps(a) for a in args}), p, args, "a list of distinct values")

    def to_tune(self):
        from ray import tune

        a = self.args
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "quniform":
            return tune.quniform(a[0], a[1], a[2])
        if self.kind == "randint":
            return tune.randint(a[0], a[1])
        return tune.choice(list(a))

    def extremes(self) -> list:
        """The values a sample can come closest to: checked against the config's own validation."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def describe(self) -> str:
        return f"{self.kind}{list(self.args)}"


def _default_space() -> dict[str, Domain]:
    return {k: Domain.from_raw(v, f"tune.space.{k}") for k, v in DEFAULT_SPACE.items()}


@dataclass
class TuneConfig:
    """Ray Tune search (jobs/tune.py): search space, searcher, scheduler and trial count."""

    # dotted config field -> one distribution ({uniform: [lo, hi]}, {loguniform: [lo, hi]}, {quniform: [lo, hi, q]},
    # {randint: [lo, hi)}, {choice: [a, b, ...]}); fields of student, synthesis, augment, filter, distill
    space: dict[str, Domain] = field(default_factory=_default_space)
    num_samples: int = 4  # trials
    metric: str = "test_acc"  # test_acc | test_loss (reported every epoch)
    mode: str = "max"  # max | min
    searcher: str = "optuna"  # optuna (TPE) | random
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 1  # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: float = 2.0  # ASHA: keep the top 1/reduction_factor at each rung
    trial_cpus: float = 0.25  # CPU of the trial function itself (its worker's cpus_per_worker and the data actors come on top)
    seed: int | None = None  # searcher seed (None: run.seed)
    # where a trial's KD loop runs: trial (in the trial's own process: no Ray Train controller and worker to
    # start per trial; one worker), ray_train (a TorchTrainer per trial, resources.num_workers workers),
    # auto (trial when resources.num_workers <= 1, else ray_train)
    train_in: str = "auto"

    def validate(self, p: str) -> None:
        space_meaning = "a non-empty mapping of 'section.field: {distribution: args}'"
        _check(isinstance(self.space, dict) and bool(self.space), f"{p}.space", self.space, space_meaning)
        for key, domain in self.space.items():
            domain.validate(f"{p}.space.{key}")
        _check(self.num_samples >= 1, f"{p}.num_samples", self.num_samples, "an integer >= 1")
        _check(self.metric in METRICS, f"{p}.metric", self.metric, f"one of {METRICS} (reported every epoch)")
        _check(self.mode in ("max", "min"), f"{p}.mode", self.mode, "max or min")
        _check(self.searcher in SEARCHERS, f"{p}.searcher", self.searcher, f"one of {SEARCHERS}")
        _check(self.scheduler in SCHEDULERS, f"{p}.scheduler", self.scheduler, f"one of {SCHEDULERS}")
        _check(self.grace_period >= 1, f"{p}.grace_period", self.grace_period, "an integer >= 1 (epochs)")
        _check(self.reduction_factor > 1, f"{p}.reduction_factor", self.reduction_factor, "a number > 1")
        _check(self.trial_cpus > 0, f"{p}.trial_cpus", self.trial_cpus, "a positive number (Ray refuses {'cpu': 0})")
        _check(self.train_in in TRAIN_IN, f"{p}.train_in", self.train_in, f"one of {TRAIN_IN}")

    def trains_in_trial(self, cfg: Config) -> bool:
        """Whether a trial runs its KD loop in its own process (``train_in``, resolved against ``resources.num_workers``)."""
        return self.train_in == "trial" or (self.train_in == "auto" and cfg.resources.num_workers <= 1)

    @property
    def keys(self) -> list[str]:
        return list(self.space)

    def param_space(self) -> dict:
        """The space as Ray Tune domains (``Tuner(param_space=...)``)."""
        return {k: d.to_tune() for k, d in self.space.items()}

    def as_params(self) -> dict[str, str]:
        """The search's own settings as MLflow params of the parent run."""
        out = {f"tune.{k}": str(v) for k, v in vars(self).items() if k != "space"}
        out.update({f"tune.space.{k}": d.describe() for k, d in self.space.items()})
        return out
