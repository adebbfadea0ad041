"""dda_ray/engines/ray_compat.py wraps the Ray internals the package cannot avoid: these tests pin what it
relies on, so a Ray upgrade that moves or changes them fails here, naming the call."""

from __future__ import annotations

import inspect

import pytest


def test_the_private_address_resolver_is_where_and_what_it_was():
    from ray._private import services

    fn = getattr(services, "canonicalize_bootstrap_address", None)
    assert fn is not None, "ray._private.services.canonicalize_bootstrap_address is gone: update dda_ray/engines/ray_compat.py"
    assert list(inspect.signature(fn).parameters)[:2] == ["addr", "temp_dir"], "its signature changed: update dda_ray/engines/ray_compat.py"


@pytest.mark.parametrize(("env", "expected"), [("10.1.2.3:6379", "10.1.2.3:6379"), ("local", None)])
def test_auto_resolves_ray_address_like_ray_init(monkeypatch, env, expected):
    """RAY_ADDRESS wins over the recorded cluster; ``local`` means start one (None), as ``ray.init`` reads it."""
    from dda_ray.engines.ray_compat import recorded_cluster_address

    monkeypatch.setenv("RAY_ADDRESS", env)
    assert recorded_cluster_address() == expected


def test_train_data_config_still_takes_per_dataset_execution_options():
    """pipeline.uneven_data_config relies on DataConfig's public constructor and default_ingest_options()."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    from dda_ray.engines.ray_train import uneven_data_config

    assert isinstance(DataConfig.default_ingest_options(), ExecutionOptions)
    assert "execution_options" in inspect.signature(DataConfig.__init__).parameters
    assert isinstance(uneven_data_config({"train": ExecutionOptions(preserve_order=True)}), DataConfig)
