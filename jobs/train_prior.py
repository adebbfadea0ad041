"""Train the local diffusion prior (augment.backend=local_prior), never on the teacher's dataset (data.path).

    python jobs/train_prior.py --config configs/prior_cifar10_cpu.yaml --bank outputs/<synthesis run>/bank [section.field=value ...]
    python jobs/train_prior.py --config configs/prior_cifar10_cpu.yaml --folder DIR_OR_ARCHIVE [...]
    python jobs/train_prior.py --config configs/prior_cifar10_cpu.yaml augment.prior_source=photos [...]

The same command as the console script ``dda-train-prior``: dda_ray/jobs/entrypoints.py holds the job and
describes the sources (``--help``; ``--print-config`` prints the resolved config).
"""

from dda_ray.jobs.entrypoints import source_overrides, train_prior_main
from dda_ray.jobs.entrypoints import split_prior_argv as _split_argv
from dda_ray.jobs.entrypoints import train_prior_job as main

__all__ = ["_split_argv", "main", "source_overrides"]

if __name__ == "__main__":
    train_prior_main()
