"""Ray Tune search over augment.strength, augment.guidance and filter.threshold (space: the YAML's ``tune:``).

    python jobs/tune.py --config configs/cifar10_cpu_tune.yaml [section.field=value ...]
    python jobs/tune.py --config configs/cifar10_cpu_tune.yaml tune.searcher=random tune.num_samples=8
    ray job submit --working-dir . -- python jobs/tune.py --config configs/cifar10_cpu_tune.yaml

Each trial runs the same TorchTrainer pipeline as jobs/distill.py (run.name=<name>-<trial id>, same
output_dir: the initial bank and the augmentation cache are shared). ASHA stops weak trials on the
per-epoch test_acc. MLflow: one parent run per search, one child run per trial. The best config is
printed and written to <output_dir>/<name>/best.yaml:

    python jobs/distill.py --config <output_dir>/<name>/best.yaml
"""

from dda_ray.cli import run_job
from dda_ray.tune import tune_search

if __name__ == "__main__":
    run_job(tune_search, description=__doc__, prepare_dir=False)  # tune_search checks the space and the tracking server first
