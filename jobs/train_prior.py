"""Train the local diffusion prior (augment.backend=local_prior) on a synthetic bank: data-free, no real images.

    python jobs/train_prior.py --config configs/prior_cifar10_cpu.yaml --bank outputs/<synthesis run>/bank [section.field=value ...]

The bank comes from ``--bank DIR`` (or ``augment.prior_bank=DIR``); the pipeline is written to
``augment.model`` (the path the ``local_prior`` backend then loads), replaced atomically. An
existing prior there is only replaced with ``--overwrite``. The loss log streams to
``<run_dir>/prior_loss.jsonl`` and is copied beside the weights (``loss.jsonl``, ``training.json``).
The class count is ``data.num_classes``; hyper-parameters are the ``augment.prior_*`` fields.
"""

import json
import sys
from pathlib import Path

from dda_ray.cli import run_job
from dda_ray.config import Config, ConfigError
from dda_ray.prior import train_prior
from dda_ray.runtime import set_threads


def main(cfg: Config, overwrite: bool = False) -> dict:
    aug = cfg.augment
    if aug.prior_bank is None:
        raise ConfigError("augment.prior_bank is not set; pass --bank DIR (a synthetic bank directory) or augment.prior_bank=DIR")
    out = Path(aug.model).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"augment.model = {aug.model!r} already holds a prior; pass --overwrite to replace it or choose another augment.model")
    set_threads(cfg.resources.torch_threads)
    summary = train_prior(
        aug.prior_bank,
        out,
        aug,
        num_classes=cfg.data.num_classes,
        log_path=cfg.run_dir / "prior_loss.jsonl",
        seed=cfg.run.seed,
        device=aug.device,
    )
    print(json.dumps(summary, indent=2))
    print(f"prior saved to {out} (augment.backend=local_prior augment.model={out})")
    return summary


def _split_argv(argv: list[str]) -> tuple[list[str], str | None, bool]:
    """Take --bank DIR / --bank=DIR and --overwrite out of argv (the rest is the shared job CLI)."""
    rest, bank, overwrite = [], None, False
    it = iter(argv)
    for arg in it:
        if arg == "--bank":
            bank = next(it, None)
            if bank is None:
                raise SystemExit("error: --bank needs a directory")
        elif arg.startswith("--bank="):
            bank = arg.split("=", 1)[1]
        elif arg == "--overwrite":
            overwrite = True
        else:
            rest.append(arg)
    return rest, bank, overwrite


if __name__ == "__main__":
    argv, bank, overwrite = _split_argv(sys.argv[1:])
    if bank is not None:
        argv.append(f"augment.prior_bank={bank}")
    run_job(lambda cfg: main(cfg, overwrite), description=__doc__, argv=argv)
