"""Train a teacher on real data.

    python jobs/train_teacher.py --config configs/teacher_cifar10_wrn16_2.yaml [section.field=value ...]

The same command as the console script ``dda-train-teacher`` (dda_ray/jobs/entrypoints.py; ``--help`` lists
every config field, ``--print-config`` prints the resolved config).
"""

from dda_ray.jobs.entrypoints import train_teacher_main

if __name__ == "__main__":
    train_teacher_main()
