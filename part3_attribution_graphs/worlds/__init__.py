"""Where a model and its transcoders come from: the offline toy world, Gemma 3 270M from PyPI (with stand-in
transcoders, or with GemmaScope 2's from the hub), or Gemma 3-1B IT from the hub. `registry` lists them and
picks one for `"auto"`."""
