"""Shared fixtures: the toy world is built once per session (0.1 s, deterministic), the planted world read
once from its shipped files."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from part3_attribution_graphs.toy import make_toy_world


def need(module: str):
    """Import an optional dependency, or skip the test without it, unless `P3AG_REQUIRE` (comma-separated)
    names the module: then a missing module fails the test. The CI tier that installs an extra requires
    it, so a broken install cannot pass as a skip."""
    required = {m.strip() for m in os.environ.get("P3AG_REQUIRE", "").split(",") if m.strip()}
    if module in required:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (the pinned tier requires it)")


@pytest.fixture(scope="session")
def toy_world():
    return make_toy_world(0)


@pytest.fixture(scope="session")
def toy_world_f64():
    return make_toy_world(0, dtype=torch.float64)


@pytest.fixture(scope="session")
def planted_world():
    from part3_attribution_graphs.worlds.planted import load_planted_world

    return load_planted_world()


@pytest.fixture(scope="session")
def planted_world_f64():
    from part3_attribution_graphs.worlds.planted import load_planted_world

    model, transcoders = load_planted_world()
    model = model.to(torch.float64)
    model.cfg.dtype = torch.float64
    return model, {layer: tc.to(torch.float64) for layer, tc in transcoders.items()}


def hook_count(model) -> int:
    """Hooks of every kind currently on the model."""
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
