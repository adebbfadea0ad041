"""The config tree: one dataclass per section, loaded from YAML plus ``section.field=value`` overrides,
coerced, validated before any work, and saved with every run.

* :mod:`~dda_ray.config.tree`: the root :class:`Config`, loading, overrides, coercion, the ``--help``
  reference and the checks across sections (the tune space against the rest);
* :mod:`~dda_ray.config.sections`: the typed sections (run, data, teacher, ..., tracking), each with its validation;
* :mod:`~dda_ray.config.space`: the ``tune`` section (search space, searcher, scheduler).

Everything public is importable from here (``from dda_ray.config import Config, load_config``).
"""

from .tree import *  # noqa: F403 - the package's public names are the tree's __all__
from .tree import __all__  # noqa: F401
