"""Ray Tune over augment strength, guidance and filter threshold.

* :mod:`~dda_ray.tune.search`: the search (driver side);
* :mod:`~dda_ray.tune.trial`: one trial (trains in its own process or through a TorchTrainer), its
  resources, searcher and scheduler;
* :mod:`~dda_ray.tune.results`: trial rows, best.yaml, the MLflow parent/child bookkeeping.
"""
