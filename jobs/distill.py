"""Distil a student from a teacher without its training data (DDA: synthesis -> diffusion -> filter -> KD).

    python jobs/distill.py --config configs/cifar10_cpu_smoke.yaml [section.field=value ...]
    ray job submit --working-dir . -- python jobs/distill.py --config configs/cifar10_cpu_smoke.yaml

Starts an embedded local Ray unless RAY_ADDRESS points at a cluster; run.engine=local runs
everything in this process without Ray.
"""

from dda_ray.api import distill, preflight
from dda_ray.cli import run_job

if __name__ == "__main__":
    run_job(distill, description=__doc__, preflight=preflight)
