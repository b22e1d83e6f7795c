"""Shortcut: `from part3_attribution_graphs.toy import make_toy_world` (the code lives in `worlds/toy.py`)."""

from .worlds.toy import TOY_N_LAYERS, make_toy_tokenizer, make_toy_world

__all__ = ["make_toy_world", "make_toy_tokenizer", "TOY_N_LAYERS"]
