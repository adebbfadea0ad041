"""The jobs' command lines: :mod:`~dda_ray.jobs.cli` (the shared command line: config, overrides, one
``error:`` line per refusal) and :mod:`~dda_ray.jobs.entrypoints` (``jobs/*.py`` and the console scripts
``dda-*``). The Python API is :mod:`dda_ray.api`."""
