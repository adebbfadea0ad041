"""Distil a student from a teacher without its training data (DDA: synthesis -> diffusion -> filter -> KD).

    python jobs/distill.py --config configs/cifar10_cpu_smoke.yaml [section.field=value ...]
    ray job submit --working-dir . -- python jobs/distill.py --config configs/cifar10_cpu_smoke.yaml

The same command as the console script ``dda-distill`` (dda_ray/jobs/entrypoints.py; ``--help`` lists every
config field, ``--print-config`` prints the resolved config).
"""

from dda_ray.jobs.entrypoints import distill_main

if __name__ == "__main__":
    distill_main()
