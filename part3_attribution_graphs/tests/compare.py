"""Checking what learner code returns: types, shapes, finiteness, closeness to the reference, and naming
the known mistake an answer reproduces."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..nodes import GraphNodes
from .messages import _Fail, _short
from .worlds import _tolerance


def _tensor(
    x: Any,
    what: str,
    *,
    shape: tuple | None = None,
    device: torch.device | None = None,
    floating: bool = True,
    nan_hint: str = "",
) -> Tensor:
    """Check type, shape, dtype, device and finiteness; return the tensor detached."""
    if not isinstance(x, Tensor):
        raise _Fail(f"{what} should be a torch.Tensor, got {type(x).__name__}.")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise _Fail(f"{what} has shape {tuple(x.shape)}, expected {tuple(shape)}.")
    if floating and not x.is_floating_point():
        raise _Fail(f"{what} has dtype {x.dtype}, expected a floating-point tensor.")
    if not floating and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise _Fail(f"{what} has dtype {x.dtype}, expected an integer tensor (torch.long).")
    if device is not None and x.device.type != device.type:
        raise _Fail(f"{what} is on {x.device}, but the model's tensors are on {device}.")
    if floating and not torch.isfinite(x).all():
        raise _Fail(f"{what} contains NaN or inf values.{(' ' + nan_hint) if nan_hint else ''}")
    return x.detach()


def _items(x: Any, n: int, what: str) -> tuple:
    if not isinstance(x, (tuple, list)) or len(x) != n:
        got = f"a {type(x).__name__} of length {len(x)}" if isinstance(x, (tuple, list)) else type(x).__name__
        raise _Fail(f"{what} should return a tuple of {n} things, got {got}.")
    return tuple(x)


def _list(x: Any, what: str, n: int | None = None) -> list:
    if isinstance(x, Tensor):
        raise _Fail(
            f"{what} should be a Python list (one entry per node), not a stacked tensor: "
            "build_graph_nodes joins the lists with +."
        )
    if not isinstance(x, list):
        raise _Fail(f"{what} should be a list, got {type(x).__name__}.")
    if n is not None and len(x) != n:
        raise _Fail(f"{what} has {len(x)} entries, expected {n}.")
    return x


def _stack(vecs: list, what: str, d_model: int, device: torch.device) -> Tensor:
    """Stack a list of (d_model,) vectors after checking each one."""
    for i, v in enumerate(vecs):
        _tensor(v, f"{what}[{i}]", shape=(d_model,), device=device)
    if not vecs:
        return torch.zeros(0, d_model, device=device)
    # Keep the learner's dtype, so comparisons use the tolerance of the precision they worked in.
    return torch.stack([v.detach().to(device, vecs[0].dtype) for v in vecs])


def _float(x: Any, what: str) -> float:
    """A finite Python float (a NaN or an infinity compares as neither right nor wrong, so it is refused)."""
    try:
        value = float(x)
    except (TypeError, ValueError, RuntimeError):
        raise _Fail(f"{what} should be a number, got {type(x).__name__} {_short(repr(x), 80)}.") from None
    if not math.isfinite(value):
        raise _Fail(
            f"{what} is {value}: it should be a finite number (a 0/0 or a log of 0 somewhere on the way?)."
        )
    return value


def _int(x: Any, what: str) -> int:
    if isinstance(x, Tensor) and x.numel() == 1 and not x.is_floating_point():
        return int(x.item())
    if isinstance(x, bool) or not isinstance(x, int):
        raise _Fail(f"{what} should be an int, got {type(x).__name__} {_short(repr(x), 80)}.")
    return x


def _bad(actual: Tensor, expected: Tensor, tol: float) -> Tensor:
    """Elementwise mismatch mask, tolerance relative to the expected tensor's scale.

    A learner's tensor kept in a less precise dtype than the model (e.g. torch.zeros defaults to float32)
    is held to that dtype's tolerance.
    """
    if actual.is_floating_point():
        tol = max(tol, _tolerance(actual.dtype))
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.abs().max().item() if e.numel() else 0.0
    return (a - e).abs() > tol * max(scale, 1e-12) + tol * e.abs()


def _close(actual: Tensor, expected: Tensor, tol: float) -> bool:
    if tuple(actual.shape) != tuple(expected.shape):
        return False
    return not bool(_bad(actual, expected, tol).any())


def _worst(actual: Tensor, expected: Tensor, index_names: str = "") -> str:
    """'at [i, j]: got x, expected y' for the largest difference."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    i = int((a - e).abs().flatten().argmax())
    idx = list(torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else []
    where = f"{index_names}[{', '.join(str(int(k)) for k in idx)}]"
    return f"at {where}: got {a.flatten()[i].item():.4g}, expected {e.flatten()[i].item():.4g}"


def _diagnose(
    actual: Tensor, candidates: Sequence[tuple[str, Callable[[], Tensor]]], tol: float
) -> str | None:
    """The hint of the first known mistake whose output `actual` reproduces."""
    for hint, make in candidates:
        try:
            cand = make()
        except Exception:  # noqa: BLE001 - a candidate that can't be formed simply doesn't match
            continue
        if tuple(cand.shape) == tuple(actual.shape) and _close(actual, cand, max(tol, 1e-6)):
            return hint
    return None


def _ntype(node: Any) -> str:
    """A node's type as 'embedding' | 'latent' | 'mlp_error' | 'logit' (works with a notebook's own enum)."""
    t = getattr(node, "node_type", None)
    value = getattr(t, "value", t)
    if value in ("embedding", "latent", "mlp_error", "logit"):
        return value
    return str(getattr(t, "name", t)).lower()


def _node_attr(node: Any, attr: str, what: str) -> Any:
    if not hasattr(node, attr):
        raise _Fail(
            f"{what} has no attribute `{attr}`: build nodes with NodeInfo(node_type, layer, ctx_idx, "
            f"feature, ...)."
        )
    return getattr(node, attr)


def _node_number(node: Any, attr: str, what: str, kind: type) -> Any:
    """A node attribute that must be a plain Python number (node ids and JSON exports rely on it)."""
    value = _node_attr(node, attr, what)
    if isinstance(value, Tensor):
        raise _Fail(
            f"{what}: `{attr}` is a tensor ({_short(repr(value), 60)}); store a plain Python "
            f"{kind.__name__} (use .item())."
        )
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise _Fail(f"{what}: `{attr}` should be a Python {kind.__name__}, got {type(value).__name__}.")
    return value


def _copy_graph(graph: GraphNodes) -> GraphNodes:
    """A copy the learner may scribble on without touching the cached reference graph."""
    return GraphNodes(
        nodes=list(graph.nodes),
        writing_vecs=graph.writing_vecs.clone(),
        reading_vecs=graph.reading_vecs.clone(),
        node_range_dict=dict(graph.node_range_dict),
        seq_len=graph.seq_len,
        n_layers=graph.n_layers,
    )
