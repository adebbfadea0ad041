"""Where a run executes: the engines that supply the driver's rows and take its reports.

* :mod:`~dda_ray.engines.local`: one process, no Ray (``run.engine=local``);
* :mod:`~dda_ray.engines.ray_train`: the Ray engine: the Ray Data graph (:mod:`~dda_ray.engines.stages`
  as actor pools over :mod:`~dda_ray.engines.pool_source`), the TorchTrainer wiring, a worker's rows
  (:mod:`~dda_ray.engines.ray_source`), the shared-disk check (:mod:`~dda_ray.engines.shared_disk`);
* :mod:`~dda_ray.engines.ray_compat`: the only Ray internals used, and the ``RAY_ADDRESS`` check.
"""
