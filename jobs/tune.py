"""Ray Tune search over augment.strength, augment.guidance and filter.threshold (space: the YAML's ``tune:``).

    python jobs/tune.py --config configs/cifar10_cpu_tune.yaml [section.field=value ...]
    ray job submit --working-dir . -- python jobs/tune.py --config configs/cifar10_cpu_tune.yaml

The same command as the console script ``dda-tune`` (dda_ray/jobs/entrypoints.py, which also describes the
search; ``--help`` lists every config field, ``--print-config`` prints the resolved config).
"""

from dda_ray.jobs.entrypoints import tune_main

if __name__ == "__main__":
    tune_main()
