"""The initial bank and the run's Synthesizer.

* :func:`run_synthesizer`: the one construction of a run's :class:`~dda_ray.synthesis.synthesizer.Synthesizer`
  every caller uses (the teacher loaded, a chained method's state restored from its bank);
* :func:`build_initial_bank`: the bank's ``synthesis.init_rounds`` rounds, in this process or over
  ``resources.synthesis_tasks`` Ray tasks (:func:`synthesize_rounds`), each round written with its
  provenance, a bank made before by the same teacher and settings reused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..data.bank import bank_files, check_provenance, round_of, write_round
from ..models.checkpoint import fingerprint
from ..progress import bar as progress_bar
from ..runtime import derive_seed
from .synthesizer import Synthesizer, build_synthesizer


def initial_bank_dir(cfg: Config) -> Path:
    return Path(cfg.synthesis.bank_dir) if cfg.synthesis.bank_dir else cfg.run_dir / "bank"


def bank_provenance(cfg: Config, synthesizer: Synthesizer, initial: bool = True) -> dict[str, str]:
    """What made a bank's rounds: the teacher's weights and the synthesis settings and seed."""
    sc = cfg.synthesis
    size, steps = (sc.init_batch_size, sc.init_g_steps) if initial else (sc.batch_size, sc.g_steps)
    settings = f"batch_size={size} g_steps={steps} lr_g={sc.lr_g} nz={sc.nz} ngf={sc.ngf} bn={sc.bn} oh={sc.oh} seed={cfg.run.seed}"
    if sc.method == "fast":
        settings += f" lr_z={sc.lr_z} bn_momentum={sc.bn_momentum} meta_lr={sc.meta_lr}"
    if sc.method == "cmi":
        settings += f" cr={sc.cr} cr_t={sc.cr_t} cmi_bank_size={sc.cmi_bank_size} cmi_negatives={sc.cmi_negatives} cmi_head_dim={sc.cmi_head_dim}"
    if not initial:
        settings += f" adv={sc.adv} adv_term={sc.adv_term}"
    return {"teacher": fingerprint(synthesizer.teacher), "synthesis": settings, "method": sc.method}


SYNTHESIS_STATE = "synthesizer.pt"  # a chained method (fast, cmi): the chain's state after the bank's last round


def _save_synthesis_state(bank_dir: Path, synthesizer: Synthesizer) -> None:
    tmp = bank_dir / f".{SYNTHESIS_STATE}.tmp"
    torch.save(synthesizer.state_dict(), tmp)
    tmp.replace(bank_dir / SYNTHESIS_STATE)


def load_bank_synthesis_state(cfg: Config, synthesizer: Synthesizer) -> None:
    """A chained method's state where the initial bank's chain left it (``_build_chain`` resumes
    an interrupted bank from it; ``fast``'s rounds with the student continue it). ``dda``: nothing."""
    if not synthesizer.chained:
        return
    path = initial_bank_dir(cfg) / SYNTHESIS_STATE
    method = cfg.synthesis.method
    if not path.exists():
        raise RuntimeError(f"the {method} synthesis state {path} is missing: the initial bank under {path.parent} was not made with synthesis.method={method}")
    synthesizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def build_initial_bank(cfg: Config, synthesizer: Synthesizer, progress: bool = True) -> Path:
    """Synthesise the initial bank (no student, adv = 0), skipping rounds already on disk.

    Rounds are independent and seeded by (run seed, round), so a bank shared between runs or
    finished after an interruption is identical to one made in one go. Rounds on disk made by
    another teacher or with other settings are refused (:func:`check_provenance`). With
    ``resources.synthesis_tasks > 0`` and Ray running, the missing rounds are spread over that many
    concurrent Ray tasks (:func:`synthesize_rounds`, each with ``synthesis_cpus`` / ``synthesis_gpus``);
    otherwise they run here, one after another. A chained method's rounds (``fast``, ``cmi``) form
    one chain, run in order (:func:`_build_chain`): in one Ray task when tasks are asked for, else
    here; ``synthesizer`` ends holding the chain either way.
    """
    sc = cfg.synthesis
    bank_dir = initial_bank_dir(cfg)
    provenance = bank_provenance(cfg, synthesizer)
    existing = bank_files(bank_dir)
    for path in existing:
        check_provenance(path, provenance)
    done = {round_of(p) for p in existing}
    todo = [r for r in range(sc.init_rounds) if r not in done]
    if synthesizer.chained and todo and cfg.resources.synthesis_tasks > 0 and _ray_running():
        # one chain: one Ray task (on a cluster it runs where the synthesis GPUs are), then continue from it here
        _build_with_ray_tasks(cfg, bank_dir, todo, provenance, progress, max_tasks=1)
        load_bank_synthesis_state(cfg, synthesizer)
        return bank_dir
    if synthesizer.chained:
        return _build_chain(cfg, synthesizer, bank_dir, todo, provenance, progress)
    if todo and cfg.resources.synthesis_tasks > 0 and _ray_running():
        _build_with_ray_tasks(cfg, bank_dir, todo, provenance, progress)
        return bank_dir
    for r in progress_bar(todo, desc="initial bank", unit="round", disable=not progress or not todo):
        res = synthesizer.run_round(r, derive_seed(cfg.run.seed, "bank", r), sc.init_batch_size, sc.init_g_steps, adv=0.0)
        write_round(bank_dir, res.batch, r, provenance)
    return bank_dir


def run_synthesizer(cfg: Config, teacher: tuple | None = None, device: torch.device | str | None = None, progress: bool = True) -> Synthesizer:
    """THE construction of a run's Synthesizer: built against the teacher, the initial bank made
    (rounds already on disk skipped, see :func:`build_initial_bank`), and for ``fast`` the chain
    left at the bank's end, where the rounds with the student continue it (Fast's warm-up and
    training are one process). ``cmi``'s rounds with the student start a fresh chain (projection
    head, empty memory bank), as the reference's bank-then-train scripts do (two processes).

    ``teacher``: ``(model, normalize)`` as :func:`~dda_ray.models.checkpoint.load_teacher` returns them;
    None: a standalone call (the Ray driver, Tune's shared bank, the benchmarks) sets the threads,
    seeds with ``run.seed`` and loads the teacher here. ``device``: default ``resources.use_gpu``'s.
    """
    from ..models.checkpoint import load_teacher
    from ..runtime import resolve_device, seed_everything, set_threads

    if teacher is None:
        set_threads(cfg.resources.torch_threads)
        seed_everything(cfg.run.seed)
        teacher = load_teacher(cfg)[:2]
    device = resolve_device("auto" if cfg.resources.use_gpu else "cpu") if device is None else device
    synthesizer = build_synthesizer(cfg, teacher[0], teacher[1], device)
    build_initial_bank(cfg, synthesizer, progress)
    if synthesizer.method == "cmi":
        synthesizer.reset_chain()
    return synthesizer


def _build_chain(cfg: Config, synthesizer: Synthesizer, bank_dir: Path, todo: list[int], provenance: dict[str, str], progress: bool) -> Path:
    """A chained method (``fast``, ``cmi``): rounds form one chain (each continues the state the
    one before left: fast's meta-generator, cmi's head and memory bank), so they run here in order,
    and the chain's state is saved beside the rounds after each one: an interrupted bank resumes
    exactly, and runs sharing the bank continue from its end."""
    sc = cfg.synthesis
    if (bank_dir / SYNTHESIS_STATE).exists():
        load_bank_synthesis_state(cfg, synthesizer)
    elif sc.init_rounds - len(todo):
        raise RuntimeError(f"{bank_dir} holds rounds but no {SYNTHESIS_STATE}: it was not made with synthesis.method={sc.method}")
    if todo and todo != list(range(synthesizer.rounds_done, sc.init_rounds)):
        raise RuntimeError(f"{sc.method} bank {bank_dir}: rounds {todo} are missing but its chain stopped after round {synthesizer.rounds_done - 1}")
    for r in progress_bar(todo, desc=f"initial bank ({sc.method} chain)", unit="round", disable=not progress or not todo):
        res = synthesizer.run_round(r, derive_seed(cfg.run.seed, "bank", r), sc.init_batch_size, sc.init_g_steps, adv=0.0)
        write_round(bank_dir, res.batch, r, provenance)
        _save_synthesis_state(bank_dir, synthesizer)
    return bank_dir


def synthesize_rounds(cfg_dict: dict, bank_dir: str, rounds: list[int], provenance: dict[str, str]) -> list[int]:
    """Body of one Ray task: load the teacher, synthesise ``rounds`` of the initial bank, write them."""
    from ..config import config_from_dict
    from ..models.checkpoint import load_teacher
    from ..runtime import resolve_device, set_threads

    cfg = config_from_dict(cfg_dict)
    set_threads(cfg.resources.torch_threads)
    teacher, normalize, _ = load_teacher(cfg)
    device = resolve_device("auto" if cfg.resources.synthesis_gpus > 0 else "cpu")
    synthesizer = build_synthesizer(cfg, teacher, normalize, device)
    if fingerprint(synthesizer.teacher) != provenance["teacher"]:
        raise RuntimeError(f"the task's teacher ({cfg.teacher.checkpoint}) is not the driver's: is the checkpoint on storage every node sees?")
    sc = cfg.synthesis
    if synthesizer.chained:  # the whole chain, in order, from its saved state
        _build_chain(cfg, synthesizer, Path(bank_dir), rounds, provenance, progress=False)
        return rounds
    for r in rounds:
        res = synthesizer.run_round(r, derive_seed(cfg.run.seed, "bank", r), sc.init_batch_size, sc.init_g_steps, adv=0.0)
        write_round(bank_dir, res.batch, r, provenance)
    return rounds


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _build_with_ray_tasks(cfg: Config, bank_dir: Path, todo: list[int], provenance: dict[str, str], progress: bool, max_tasks: int | None = None) -> None:
    """At most ``synthesis_tasks`` (and ``max_tasks``) tasks in flight, each taking an equal share of the missing rounds.

    The progress bar counts round files as they land in ``bank_dir`` (each task writes its rounds
    one by one, atomically), so it moves per round, not per task."""
    import ray

    res = cfg.resources
    n = min(res.synthesis_tasks, len(todo), max_tasks or len(todo))
    chunks = [todo[i::n] for i in range(n)]
    task = ray.remote(synthesize_rounds).options(num_cpus=res.synthesis_cpus, num_gpus=res.synthesis_gpus, max_retries=2)
    cfg_dict = cfg.to_dict()
    pending = [task.remote(cfg_dict, str(bank_dir), chunk, provenance) for chunk in chunks]
    wanted = set(todo)
    with progress_bar(total=len(todo), desc=f"initial bank ({n} Ray tasks)", unit="round", disable=not progress) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
            ray.get(ready)  # a task that failed (after its retries) raises here
            written = sum(1 for p in bank_files(bank_dir) if round_of(p) in wanted)
            bar.update(written - bar.n)
    missing = sorted(set(range(cfg.synthesis.init_rounds)) - {round_of(p) for p in bank_files(bank_dir)})
    if missing:
        raise RuntimeError(f"initial bank rounds {missing} are missing under {bank_dir} after the Ray tasks finished")
