"""Train a teacher on real data.

    python jobs/train_teacher.py --config configs/teacher_cifar10_wrn16_2.yaml [section.field=value ...]
"""

from dda_ray.api import train_teacher
from dda_ray.cli import run_job

if __name__ == "__main__":
    run_job(train_teacher, description=__doc__)
