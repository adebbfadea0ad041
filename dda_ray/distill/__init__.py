"""Stage 4, distillation: the KD loop and the one run driver both engines use.

* :mod:`~dda_ray.distill.kd`: KD losses, the Distiller, the epoch loop;
* :mod:`~dda_ray.distill.driver`: THE run driver (set-up, resume and rewind, epochs, reports, final save)
  and the :class:`~dda_ray.distill.driver.Engine` interface an engine implements;
* :mod:`~dda_ray.distill.sources`: the loop's rows in this process (bank, rounds with the student, real split).
"""
