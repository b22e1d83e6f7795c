"""What a clean run or a result was made from, cheap to check again.

- `versions`: per tensor, where its storage is and how often it was changed in place (torch's `_version`
  counter, bumped by every in-place operation). Equal versions mean the same tensors, unchanged, in this
  process: what a `CleanRun` keeps of the model, the transcoders and its own tensors.
- `weights_digest`: a hash of a module's parameters that survives saving (what a result keeps of the model
  and transcoders); computed once and cached until a parameter's version or storage changes.
- `tensor_digest`: a hash of one tensor's values, computed in chunks (no float64 copy of the whole tensor):
  its shape and dtype, its sum and a position-weighted sum in float64, and a strided sample of its values.
  A change that keeps every sampled value and both sums is missed; scaling, zeroing, editing one entry
  or swapping two are not.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["tensor_digest", "versions", "weights_digest"]

_CHUNK = 1 << 22  # entries summed at once
_SAMPLE = 1 << 12  # entries of each tensor hashed as they are
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def versions(named: Iterable[tuple[str, Tensor]]) -> dict[str, tuple]:
    """`{name: (storage address, in-place change count, shape, dtype)}` of each tensor."""
    return {name: (t.data_ptr(), t._version, tuple(t.shape), t.dtype) for name, t in named}


def tensor_digest(t: Tensor) -> str:
    """A hash of `t`'s shape, dtype and values (see the module docstring for what it can miss)."""
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    flat = t.detach().reshape(-1)
    total = weighted = 0.0
    with torch.no_grad():
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start : start + _CHUNK].to(torch.float64)
            weights = torch.arange(start, start + len(chunk), dtype=torch.float64, device=chunk.device) % 997
            total += float(chunk.sum())
            weighted += float((chunk * (weights + 1)).sum())
        sample = flat[:: max(1, flat.numel() // _SAMPLE)].to("cpu", torch.float64)
    h.update(f"{total!r} {weighted!r}".encode())
    h.update(sample.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of `module`'s parameters (names, shapes, values), cached until one of them changes."""
    named = sorted(module.named_parameters())
    state = versions(named)
    cached = _cache.get(module)
    if cached is not None and cached[0] == state:
        return cached[1]
    h = hashlib.sha256()
    for name, p in named:
        h.update(f"{name} {tensor_digest(p)}".encode())
    digest = h.hexdigest()[:16]
    _cache[module] = (state, digest)
    return digest
