"""Attribution graphs on Gemma 3 with GemmaScope 2 transcoders: reference code for the course notebooks.

The stages, one module each: `replacement` (freeze + skip hooks), `nodes`, `attribution` (edges and
the `attribute` pipeline), `pruning`, `views` (dashboard, exports, figures), `worlds` (models).
"""

__version__ = "0.1.0"
