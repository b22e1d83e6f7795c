"""Where a model and its transcoders come from: the offline toy world, Gemma 3-1B IT from the hub,
or Gemma 3 270M from PyPI."""
