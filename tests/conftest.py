"""Shared fixtures: the toy world is built once per session (0.1 s, deterministic)."""

from __future__ import annotations

import pytest
import torch

from part3_attribution_graphs.toy import make_toy_world


@pytest.fixture(scope="session")
def toy_world():
    return make_toy_world(0)


@pytest.fixture(scope="session")
def toy_world_f64():
    return make_toy_world(0, dtype=torch.float64)


def hook_count(model) -> int:
    """Hooks of every kind currently on the model."""
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
