"""Train a teacher on real data.

    python jobs/train_teacher.py --config configs/teacher_cifar10_wrn16_2.yaml [section.field=value ...]
"""

from dda_ray.cli import run_job
from dda_ray.teacher import train_teacher

if __name__ == "__main__":
    run_job(lambda cfg: train_teacher(cfg), description=__doc__)
