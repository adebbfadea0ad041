"""Train the local diffusion prior (augment.backend=local_prior), never on the teacher's dataset (data.path).

    python jobs/train_prior.py --config configs/prior_cifar10_cpu.yaml --bank outputs/<synthesis run>/bank [section.field=value ...]
    python jobs/train_prior.py --config configs/prior_cifar10_cpu.yaml --folder DIR_OR_ARCHIVE [...]
    python jobs/train_prior.py --config configs/prior_cifar10_cpu.yaml augment.prior_source=photos [...]

What it trains on is ``augment.prior_source`` (docs/AUGMENTATION.md):

* ``bank`` (default): the synthetic bank from ``--bank DIR`` (or ``augment.prior_bank=DIR``), with its labels;
* ``folder``: any unlabeled images under ``--folder DIR`` (or ``augment.prior_source=folder
  augment.prior_folder=DIR``), searched recursively, or a .tar/.tar.gz/.tgz/.zip archive of them;
* ``photos``: natural photographs shipped inside scikit-image, scikit-learn and matplotlib (offline).

``folder`` and ``photos`` train on random resized crops at ``data.image_size``
(``augment.prior_crop_scale``, ``augment.prior_color_jitter``), labelled by the teacher
(``augment.prior_labels=teacher``: ``teacher.arch`` / ``teacher.checkpoint``) or by nobody (``none``).

The pipeline is written to ``augment.model`` (the path the ``local_prior`` backend then loads),
replaced atomically. An existing prior there is only replaced with ``--overwrite``. The loss log
streams to ``<run_dir>/prior_loss.jsonl`` and is copied beside the weights (``loss.jsonl``,
``training.json``: also the source, its image list and the label mode). The class count is
``data.num_classes``; hyper-parameters are the ``augment.prior_*`` fields.
"""

import json
import sys
from pathlib import Path

from dda_ray.cli import run_job
from dda_ray.config import Config, ConfigError
from dda_ray.prior import train_prior
from dda_ray.prior_data import build_prior_source
from dda_ray.runtime import resolve_device, set_threads


def main(cfg: Config, overwrite: bool = False) -> dict:
    aug = cfg.augment
    if aug.prior_source == "bank" and aug.prior_bank is None:
        raise ConfigError("augment.prior_bank is not set; pass --bank DIR (a synthetic bank directory) or augment.prior_bank=DIR")
    if aug.prior_source == "folder" and aug.prior_folder is None:
        raise ConfigError("augment.prior_source = 'folder' but augment.prior_folder is not set; pass --folder DIR or augment.prior_folder=DIR")
    out = Path(aug.model).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"augment.model = {aug.model!r} already holds a prior; pass --overwrite to replace it or choose another augment.model")
    set_threads(cfg.resources.torch_threads)
    device = resolve_device(aug.device)
    source = build_prior_source(cfg, device)
    summary = train_prior(
        source,
        out,
        aug,
        num_classes=cfg.data.num_classes,
        log_path=cfg.run_dir / "prior_loss.jsonl",
        seed=cfg.run.seed,
        device=str(device),
    )
    shown = {k: v for k, v in summary.items() if k not in ("images", "skipped")}  # the lists are in training.json
    print(json.dumps(shown, indent=2))
    print(f"prior saved to {out} (augment.backend=local_prior augment.model={out})")
    return summary


def _split_argv(argv: list[str]) -> tuple[list[str], str | None, str | None, bool]:
    """Take --bank DIR, --folder DIR (or --bank=DIR, --folder=DIR) and --overwrite out of argv (the rest is the shared job CLI)."""
    rest, found, overwrite = [], {"--bank": None, "--folder": None}, False
    it = iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag in found:
            if not eq:
                value = next(it, None)
                if value is None:
                    raise SystemExit(f"error: {flag} needs a directory")
            found[flag] = value
        elif arg == "--overwrite":
            overwrite = True
        else:
            rest.append(arg)
    if found["--bank"] is not None and found["--folder"] is not None:
        raise SystemExit("error: pass either --bank (a synthetic bank) or --folder (unlabeled images), not both")
    return rest, found["--bank"], found["--folder"], overwrite


def source_overrides(bank: str | None, folder: str | None) -> list[str]:
    """The config overrides --bank / --folder stand for."""
    if bank is not None:
        return ["augment.prior_source=bank", f"augment.prior_bank={bank}"]
    if folder is not None:
        return ["augment.prior_source=folder", f"augment.prior_folder={folder}"]
    return []


if __name__ == "__main__":
    argv, bank, folder, overwrite = _split_argv(sys.argv[1:])
    run_job(lambda cfg: main(cfg, overwrite), description=__doc__, argv=argv + source_overrides(bank, folder))
