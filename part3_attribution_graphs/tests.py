"""The autograder: call `tests.test_<exercise>(your_function)` right after writing each exercise.

Every test builds its inputs with the reference code (so a mistake in an earlier exercise cannot
cascade into a later one), runs your function and the reference on a small toy Gemma 3 world and on
hand-made cases, and compares the values. Pass `model=..., transcoders=...` to repeat the comparison
on the model you loaded. A pass prints one line; a failure raises `AssertionError` saying what is
probably wrong, with the values that differ.

Tests leave the model as they found it: every hook your code adds is removed afterwards (and
reported if your code should have removed it itself).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import attribution as _attribution
from .attribution import (
    compute_adjacency_matrix,
    prepare_backward_batches,
    setup_attribution,
    validate_transcoders,
)
from .nodes import (
    GraphNodes,
    NodeInfo,
    NodeType,
    build_graph_nodes,
    build_intermediate_nodes,
    compute_salient_logits,
)
from .pruning import compute_influence, normalize_matrix, prune_edges, prune_nodes
from .replacement import FreezeHooks, TranscoderReplacementHooks, skip_output
from .worlds.gemma import START_POSN, format_prompt

__all__ = [
    "test_transcoder_replacement_hooks",
    "test_compute_salient_logits",
    "test_build_embedding_nodes",
    "test_build_intermediate_nodes",
    "test_prepare_backward_batches",
    "test_compute_adjacency_matrix",
    "test_compute_influence",
    "test_prune_nodes",
    "test_prune_edges",
]

# Short prompts keep every test to a fraction of a second on the toy world (14 tokens, ~260 nodes).
TOY_PROMPT = ("opposite of small?", "large")
REAL_PROMPT = ("What is the opposite of small?", "The opposite of small is")
SECOND_PROMPT = ("Tell me a fact.", "yes")


class _Fail(Exception):
    """A test failure; the public test turns it into a plain AssertionError with a short traceback."""


# --------------------------------------------------------------------------------------------------
# The worlds the tests run on
# --------------------------------------------------------------------------------------------------


@dataclass
class _World:
    """A model, its transcoders, one prompt and everything the reference pipeline computes on it."""

    model: Any
    transcoders: dict
    toy: bool
    tokens: Int[Tensor, "1 seq"]
    start_posn: int
    top_k: int
    batch_size: int
    freeze: FreezeHooks
    cache: Any
    logits: Float[Tensor, "1 seq d_vocab"]
    graph: GraphNodes
    batches: list
    adjacency: Float[Tensor, "n n"]
    logit_weights: Float[Tensor, " n_logits"]
    tol: float
    small: bool  # tiny matrices: one thread is faster (the toy world, or a test double of similar size)
    extra: dict = field(default_factory=dict)  # lazily computed extras (second cases, reference gradients)

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def name(self) -> str:
        return "the toy graph" if self.toy else "your model's graph"

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def tc_hooks(self, transcoders: dict | None = None) -> TranscoderReplacementHooks:
        """A fresh, uninstalled reference hook object (cheap: one encode per layer)."""
        return TranscoderReplacementHooks(self.model, self.transcoders if transcoders is None else transcoders,
                                          self.cache)


_TOY: _World | None = None
_REAL: _World | None = None  # only the latest real model is kept, so an old one can be freed


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for comparing two correct computations done in a different order."""
    return {torch.float64: 1e-8, torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}.get(dtype, 2e-4)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence the reference pipeline's tqdm bar, so a passing test prints exactly one line."""
    saved = _attribution.tqdm
    _attribution.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        _attribution.tqdm = saved


class _NoSkipHooks:
    """Stands in for TranscoderReplacementHooks when we want gradients through the real MLPs."""

    installed = True

    def install(self) -> _NoSkipHooks:
        return self

    def remove(self) -> None:
        pass


def _reference_adjacency(w: _World, graph: GraphNodes, batches: list, start_posn: int,
                         tc_hooks: Any = None) -> Tensor:
    hooks = w.tc_hooks() if tc_hooks is None else tc_hooks
    with _no_progress_bars():
        return compute_adjacency_matrix(w.model, w.tokens, graph, w.freeze, hooks, batches, start_posn)


def _build_world(model: Any, transcoders: dict, toy: bool) -> _World:
    prompt = format_prompt(*(TOY_PROMPT if toy else REAL_PROMPT))
    tokens = model.to_tokens(prompt)
    # A real model is big: fewer latents per position, and few small batches of targets (see _subset).
    top_k, batch_size = (5, 64) if toy else (3, 4)
    freeze = FreezeHooks(model)
    cache = freeze.cache_frozen_values(tokens)
    tc_hooks = TranscoderReplacementHooks(model, transcoders, cache)
    with torch.no_grad():
        logits = model(tokens)
    reading, info = compute_salient_logits(model, logits, 3)
    graph = build_graph_nodes(model, transcoders, cache, tc_hooks, reading, info, tokens, START_POSN, top_k)
    world = _World(model=model, transcoders=transcoders, toy=toy, tokens=tokens, start_posn=START_POSN,
                   top_k=top_k, batch_size=batch_size, freeze=freeze, cache=cache, logits=logits.detach(),
                   graph=graph, batches=[], adjacency=torch.empty(0), logit_weights=torch.empty(0),
                   tol=_tolerance(model.cfg.dtype), small=sum(p.numel() for p in model.parameters()) < 20_000_000)
    world.batches = batches = _subset(world, prepare_backward_batches(graph, batch_size))
    world.adjacency = _reference_adjacency(world, graph, batches, START_POSN, tc_hooks)
    world.logit_weights = torch.tensor([nd.token_prob for nd in graph.nodes if nd.node_type == NodeType.LOGIT],
                                       dtype=world.adjacency.dtype, device=world.adjacency.device)
    return world


def _subset(w: _World, batches: list) -> list:
    """All batches on the toy world; on a real model, the first batch of the first, middle and last layer
    and of the logits: enough to compare edges of every kind, and cheap even on a CPU."""
    if w.toy:
        return batches
    n = w.n_layers
    firsts = {}
    for b in batches:
        firsts.setdefault(b[4][0], b)
    return [firsts[key] for key in (0, n // 2, n - 1, "L") if key in firsts]


def _get_world(model: Any, transcoders: Any) -> _World:
    global _TOY, _REAL
    if (model is None) != (transcoders is None):
        raise _Fail("Pass both `model=` and `transcoders=` (or neither, to test on the toy world).")
    if model is None:
        if _TOY is None:
            from .worlds.toy import make_toy_world

            with _one_thread(True):
                toy_model, toy_tcs = make_toy_world()
                _TOY = _build_world(toy_model, toy_tcs, toy=True)
        return _TOY
    if _REAL is None or _REAL.model is not model or _REAL.transcoders is not transcoders:
        if not hasattr(model, "hook_dict") or not hasattr(model, "cfg"):
            raise _Fail(f"`model` should be the HookedSAETransformer you loaded, got {type(model).__name__}.")
        if not isinstance(transcoders, dict):
            raise _Fail(f"`transcoders` should be the dict {{layer: transcoder}} you loaded, got "
                        f"{type(transcoders).__name__}.")
        try:
            validate_transcoders(model, transcoders)
        except ValueError as e:
            raise _Fail(f"These transcoders don't fit this model: {e}") from None
        _REAL = None
        small = sum(p.numel() for p in model.parameters()) < 20_000_000
        with _one_thread(small):
            _REAL = _build_world(model, transcoders, toy=False)
    return _REAL


@contextlib.contextmanager
def _one_thread(active: bool) -> Iterator[None]:
    """The toy world's matrices are tiny: one thread avoids costly thread hand-offs on a busy CPU."""
    if not active:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------
# Hooks: snapshot, leak count, cleanup
# --------------------------------------------------------------------------------------------------

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hook_state(model: Any) -> tuple[dict[int, tuple[set, ...]], set[int]]:
    """Which PyTorch hook ids each module holds, and which TransformerLens handles exist."""
    torch_level = {id(m): tuple(set(getattr(m, d, {})) for d in _HOOK_DICTS) for m in model.modules()}
    lens_level = {id(h) for hp in model.hook_dict.values() for h in hp.fwd_hooks + hp.bwd_hooks}
    return torch_level, lens_level


def _new_hooks(model: Any, state: tuple) -> int:
    """How many hooks (of any kind, on any module) were added since `state` and are still there."""
    torch_level, _ = state
    n = 0
    for m in model.modules():
        before = torch_level.get(id(m), (set(),) * len(_HOOK_DICTS))
        n += sum(len(set(getattr(m, d, {})) - keep) for d, keep in zip(_HOOK_DICTS, before))
    return n


def _new_lens_handles(model: Any, state: tuple) -> list:
    _, lens_level = state
    return [h for hp in model.hook_dict.values() for h in hp.fwd_hooks + hp.bwd_hooks if id(h) not in lens_level]


def _remove_new_hooks(model: Any, state: tuple) -> None:
    """Remove every hook added since `state`, whoever added it and however."""
    torch_level, lens_level = state
    for hp in model.hook_dict.values():
        for attr in ("fwd_hooks", "bwd_hooks"):
            handles = getattr(hp, attr)
            for h in handles:
                if id(h) not in lens_level:
                    h.hook.remove()
            setattr(hp, attr, [h for h in handles if id(h) in lens_level])
    for m in model.modules():
        before = torch_level.get(id(m), (set(),) * len(_HOOK_DICTS))
        for d, keep in zip(_HOOK_DICTS, before):
            hooks = getattr(m, d, None)
            if hooks is None:
                continue
            for key in [k for k in hooks if k not in keep]:
                hooks.pop(key)
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                              "_forward_pre_hooks_with_kwargs"):
                    getattr(m, extra, {}).pop(key, None)


# --------------------------------------------------------------------------------------------------
# Running learner code, checking what comes back
# --------------------------------------------------------------------------------------------------

_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(mod.__file__))
    for mod in (torch, __import__("transformer_lens"), __import__("sae_lens"))
) + (os.path.dirname(os.path.abspath(__file__)),)


def _where(exc: BaseException) -> str:
    """The innermost line of the traceback that is in your code (not torch, TransformerLens or ours)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    mine = [f for f in frames if not os.path.abspath(f.filename).startswith(_LIBRARY_DIRS)]
    frame = (mine or frames)[-1]
    line = f": `{frame.line.strip()}`" if frame.line else ""
    return f" (in {frame.name}, line {frame.lineno}{line})"


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run(fn: Callable, *args: Any, what: str, hints: Sequence[tuple[type, str, str]] = ()) -> Any:
    """Call learner code; turn any exception into a clear failure (with a hint when we know the cause)."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise _Fail(f"{what} raised NotImplementedError: did you fill in the stub?") from None
    except _Fail:
        raise
    except Exception as e:  # noqa: BLE001 - anything the learner's code raises becomes a readable failure
        msg = f"{what} raised {type(e).__name__}: {_short(e)}{_where(e)}"
        for exc_type, pattern, hint in hints:
            if isinstance(e, exc_type) and pattern in str(e):
                msg += f"\nHint: {hint}"
                break
        raise _Fail(msg) from None


def _fmt(x: Any, n: int = 4) -> str:
    """A short, readable rendering of a number, a list or a tensor."""
    if isinstance(x, Tensor):
        flat = x.detach().flatten().double().cpu()
        vals = ", ".join(f"{v:.4g}" for v in flat[:n].tolist())
        more = ", ..." if flat.numel() > n else ""
        shape = f" (shape {tuple(x.shape)})" if x.dim() > 1 else ""
        return f"[{vals}{more}]{shape}"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)) and len(x) > 12:
        return f"[{', '.join(map(repr, x[:12]))}, ...] ({len(x)} items)"
    return repr(x)


def _tensor(x: Any, what: str, *, shape: tuple | None = None, device: torch.device | None = None,
            floating: bool = True, nan_hint: str = "") -> Tensor:
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
        raise _Fail(f"{what} should be a Python list (one entry per node), not a stacked tensor: "
                    "build_graph_nodes joins the lists with +.")
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
    try:
        return float(x)
    except (TypeError, ValueError, RuntimeError):
        raise _Fail(f"{what} should be a number, got {type(x).__name__} {_short(repr(x), 80)}.") from None


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


def _diagnose(actual: Tensor, candidates: Sequence[tuple[str, Callable[[], Tensor]]], tol: float) -> str | None:
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
        raise _Fail(f"{what} has no attribute `{attr}`: build nodes with NodeInfo(node_type, layer, ctx_idx, "
                    f"feature, ...).")
    return getattr(node, attr)


def _node_number(node: Any, attr: str, what: str, kind: type) -> Any:
    """A node attribute that must be a plain Python number (node ids and JSON exports rely on it)."""
    value = _node_attr(node, attr, what)
    if isinstance(value, Tensor):
        raise _Fail(f"{what}: `{attr}` is a tensor ({_short(repr(value), 60)}); store a plain Python "
                    f"{kind.__name__} (use .item()).")
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise _Fail(f"{what}: `{attr}` should be a Python {kind.__name__}, got {type(value).__name__}.")
    return value


def _copy_graph(graph: GraphNodes) -> GraphNodes:
    """A copy the learner may scribble on without touching the cached reference graph."""
    return GraphNodes(nodes=list(graph.nodes), writing_vecs=graph.writing_vecs.clone(),
                      reading_vecs=graph.reading_vecs.clone(), node_range_dict=dict(graph.node_range_dict),
                      seq_len=graph.seq_len, n_layers=graph.n_layers)


def _check_unchanged(before: Tensor, after: Tensor, what: str) -> None:
    if before.shape != after.shape or not torch.equal(before, after):
        raise _Fail(f"Your function modified {what} in place; work on a copy (e.g. use x.abs(), not x.abs_()).")


def _public_test(exercise: str, expects: str = "function") -> Callable:
    """Wrap a test body: world set-up, one thread on the toy world, one line on success, short tracebacks."""

    def decorate(body: Callable[[Any, _World], None]) -> Callable:
        name = f"test_{exercise}"

        def test(obj: Any, *, model: Any = None, transcoders: Any = None) -> None:
            message = None
            try:
                if expects == "class" and not isinstance(obj, type):
                    raise _Fail(f"Pass the class itself: tests.{name}(TranscoderReplacementHooks), got "
                                f"{type(obj).__name__}.")
                if expects == "function" and not callable(obj):
                    raise _Fail(f"Pass the function itself: tests.{name}({exercise}), not what it returns "
                                f"(got {type(obj).__name__}).")
                if (model is None) != (transcoders is None):
                    raise _Fail("Pass both `model=` and `transcoders=` (or neither, to test on the toy world).")
                if model is not None and hasattr(model, "modules"):
                    stray = _new_hooks(model, ({}, set()))
                    if stray:
                        raise _Fail(f"Your model already carries {stray} hooks (left by an earlier cell?), which "
                                    "would distort every comparison: remove them first, e.g. "
                                    "model.reset_hooks(including_permanent=True).")
                world = _get_world(model, transcoders)
                with _one_thread(world.small), torch.inference_mode(False):
                    body(obj, world)
            except _Fail as f:
                message = str(f)
            if message is not None:
                # Raised outside the except block: the notebook shows this message, not our internals.
                raise AssertionError(message)
            print(f"All tests in `{name}` passed!")

        test.__name__ = test.__qualname__ = name
        test.__module__ = __name__
        test.__doc__ = (f"Check your `{exercise}` against the reference. {body.__doc__ or ''} Pass model=..., "
                        "transcoders=... to repeat the check on the model you loaded.")
        return test

    return decorate


# --------------------------------------------------------------------------------------------------
# TranscoderReplacementHooks
# --------------------------------------------------------------------------------------------------


class _VariantHooks:
    """Known-wrong versions of the skip trick, used only to name the mistake a learner's hooks make."""

    def __init__(self, model: Any, transcoders: dict, mode: str):
        self.model, self.transcoders, self.mode = model, transcoders, mode
        self.inputs: dict[int, Tensor] = {}
        self.state: tuple | None = None

    def install(self) -> None:
        self.state = _hook_state(self.model)
        if self.mode == "full_mlp":
            return
        for layer, tc in self.transcoders.items():
            read = f"blocks.{layer}.hook_resid_mid" if self.mode == "resid_mid" else tc.cfg.metadata.hook_name
            self.model.mod_dict[read].add_hook(functools.partial(self._capture, layer=layer), is_permanent=True)
            self.model.mod_dict[tc.cfg.metadata.hook_name_out].add_hook(
                functools.partial(self._skip, layer=layer, tc=tc), is_permanent=True)

    def _capture(self, x: Tensor, hook: Any, layer: int) -> None:
        self.inputs[layer] = x

    def _skip(self, mlp_out: Tensor, hook: Any, layer: int, tc: Any) -> Tensor:
        x = self.inputs[layer]
        if self.mode == "transposed":
            skip = x @ tc.W_skip.to(x.dtype)
        elif self.mode == "detached":
            skip = skip_output(tc, x.detach())
        else:
            skip = skip_output(tc, x)
        return skip + (mlp_out - skip).detach()

    def remove(self) -> None:
        if self.state is not None:
            _remove_new_hooks(self.model, self.state)


_TC_HOOK_MISTAKES = (
    ("full_mlp", "the gradient flows through the real MLP, not the skip: return skip + (mlp_out - skip).detach() "
                 "at hook_mlp_out; without the .detach() (or without the hook) backward sees the whole MLP"),
    ("transposed", "your skip term is x @ W_skip, but SAELens stores W_skip as (d_out, d_in): use x @ W_skip.T"),
    ("detached", "no gradient flows through your skip term: compute it from the LIVE MLP input captured by a "
                 "hook at mlp.hook_in during this forward pass, not from the cached activations (the cache is "
                 "not part of this pass's graph)"),
    ("resid_mid", "your skip term reads hook_resid_mid; the transcoder's input is blocks.{l}.mlp.hook_in "
                  "(after ln2), i.e. tc.cfg.metadata.hook_name"),
)


def _gradient_targets(w: _World) -> tuple[Tensor, Tensor, list]:
    """Three targets: a logit, a latent in the last layer and one in a middle layer."""
    g = w.graph
    picks = [g.node_range_dict["L"][0], g.node_range_dict[w.n_layers - 1][0], g.node_range_dict[w.n_layers // 2][0]]
    reading = g.reading_vecs[picks]
    positions = torch.tensor([g.nodes[i].ctx_idx for i in picks], device=w.device)
    return reading, positions, [g.nodes[i].layer for i in picks]


def _grads_with(w: _World, hooks: Any, what: str) -> dict[str, Tensor]:
    """Gradients of the three targets at every write point, with `hooks` installed."""
    reading, positions, layers = _gradient_targets(w)
    return _run(setup_attribution, w.model, w.tokens, w.freeze, reading, positions, layers, what=what,
                hints=[(RuntimeError, "second time",
                        "your hooks reuse a tensor from an earlier forward pass (probably the cached MLP input): "
                        "capture the live blocks.{l}.mlp.hook_in tensor in a hook and use that")])


def _reference_grads(w: _World) -> dict[str, Tensor]:
    if "grads" not in w.extra:
        ref = w.tc_hooks().install()
        try:
            w.extra["grads"] = _grads_with(w, ref, "the reference")
        finally:
            ref.remove()
    return w.extra["grads"]


def _grads_match(got: dict[str, Tensor], want: dict[str, Tensor], tol: float) -> str | None:
    """None if every gradient matches, else a short description of the first that does not."""
    for name, g in want.items():
        if name not in got:
            return f"no gradient at {name}"
        if not _close(got[name], g, tol):
            return f"the gradient at {name} differs, {_worst(got[name], g, 'grad')}"
    return None


def _check_tc_dicts(obj: Any, w: _World) -> None:
    ref = w.tc_hooks()
    layers = sorted(w.transcoders)
    for attr in ("transcoder_acts", "transcoder_output"):
        d = getattr(obj, attr, None)
        if not isinstance(d, dict) or sorted(d) != layers:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise _Fail(f"After install(), `{attr}` should be a dict with one entry per layer {layers}, got {got}. "
                        "Fill it in __init__ or install() from the cached MLP input (cache[tc.cfg.metadata.hook_name]).")
    for layer in layers:
        tc = w.transcoders[layer]
        exp_acts, exp_out = ref.transcoder_acts[layer], ref.transcoder_output[layer]
        acts = _tensor(obj.transcoder_acts[layer], f"transcoder_acts[{layer}]", device=w.device)
        if tuple(acts.shape) != tuple(exp_acts.shape):
            raise _Fail(f"transcoder_acts[{layer}] has shape {tuple(acts.shape)}, expected {tuple(exp_acts.shape)} "
                        "(batch, seq, d_sae): encode the whole cached input cache[tc.cfg.metadata.hook_name].")
        if not _close(acts, exp_acts, w.tol):
            raise _Fail(f"transcoder_acts[{layer}] differs from tc.encode(cache[tc.cfg.metadata.hook_name]), "
                        f"{_worst(acts, exp_acts, 'acts')}.")
        out = _tensor(obj.transcoder_output[layer], f"transcoder_output[{layer}]", shape=tuple(exp_out.shape),
                      device=w.device)
        if not _close(out, exp_out, w.tol):
            hint = _diagnose(out, [("transcoder_output includes the skip term: it should be tc.decode(acts) only "
                                    "(SAELens' decode leaves the skip out; tc(x) adds it)",
                                    lambda e=exp_out, s=ref.skip_output[layer]: e + s)], w.tol)
            raise _Fail(hint or f"transcoder_output[{layer}] should be tc.decode(transcoder_acts[{layer}]), "
                                f"{_worst(out, exp_out, 'out')}.")
        skip = getattr(obj, "skip_output", None)
        if isinstance(skip, dict) and layer in skip:
            got = _tensor(skip[layer], f"skip_output[{layer}]", device=w.device)
            if not _close(got, ref.skip_output[layer], w.tol):
                x = w.cache[tc.cfg.metadata.hook_name]
                hint = _diagnose(got, [("skip_output uses x @ W_skip; SAELens stores W_skip as (d_out, d_in): "
                                        "use x @ W_skip.T", lambda x=x, tc=tc: x @ tc.W_skip)], w.tol)
                raise _Fail(hint or f"skip_output[{layer}] should be x @ W_skip.T, {_worst(got, ref.skip_output[layer])}.")


@_public_test("transcoder_replacement_hooks", expects="class")
def _test_tc_hooks(cls: type, w: _World) -> None:
    """Forward values unchanged, gradients through W_skip only (twice in a row), and remove() cleans up."""
    model = w.model
    want = _reference_grads(w)  # before the learner's hooks go in
    state = _hook_state(model)
    try:
        obj = _run(cls, model, w.transcoders, w.cache, what="TranscoderReplacementHooks(model, transcoders, cache)")
        for method in ("install", "remove"):
            if not callable(getattr(obj, method, None)):
                raise _Fail(f"Your class has no `{method}()` method.")
        _run(obj.install, what="install()")
        if _new_hooks(model, state) == 0:
            raise _Fail("install() added no hooks to the model: for every layer, add a hook at "
                        "tc.cfg.metadata.hook_name (mlp.hook_in) that captures the live input and one at "
                        "tc.cfg.metadata.hook_name_out (hook_mlp_out) that applies the skip trick.")
        temporary = [h for h in _new_lens_handles(model, state) if not h.is_permanent]
        if temporary:
            raise _Fail(f"{len(temporary)} of the hooks install() added are not permanent: add them with "
                        "is_permanent=True, so that model.reset_hooks(), which clears temporary hooks, cannot "
                        "silently drop them.")
        _check_tc_dicts(obj, w)

        with torch.no_grad(), model.hooks(fwd_hooks=w.freeze.fwd_hooks):
            logits = _run(model, w.tokens, what="The forward pass with your hooks installed")
        if not _close(logits, w.logits, w.tol):
            raise _Fail("With your hooks installed the forward pass gives different logits "
                        f"({_worst(logits, w.logits, 'logits')}). The skip hook must return "
                        "skip + (mlp_out - skip).detach(), which equals mlp_out in the forward pass.")

        for attempt in ("first", "second"):
            got = _grads_with(w, obj, f"The {attempt} backward pass with your hooks installed")
            problem = _grads_match(got, want, w.tol)
            if problem is None:
                continue
            if attempt == "second":
                raise _Fail(f"The first backward pass is right but the second is not ({problem}): your hooks keep "
                            "a tensor from an earlier pass. Capture the live mlp.hook_in input on every forward pass.")
            _remove_new_hooks(model, state)  # take the learner's hooks out, try the known mistakes one by one
            hint = None
            for mode, text in _TC_HOOK_MISTAKES:
                variant = _VariantHooks(model, w.transcoders, mode)
                try:
                    variant.install()
                    if _grads_match(_grads_with(w, variant, "a diagnostic pass"), got, w.tol) is None:
                        hint = text
                except _Fail:
                    pass  # this mistake cannot even be made on this model (e.g. a non-square W_skip)
                finally:
                    variant.remove()
                if hint:
                    break
            raise _Fail(f"Gradients through your hooks are wrong: {hint or problem}. (Compared: the gradient of a "
                        "logit and two latent readings with respect to the embeddings and every MLP output.)")

        _run(obj.remove, what="remove()")
        left = _new_hooks(model, state)
        if left:
            raise _Fail(f"your remove() left {left} hooks on the model: remove every hook install() added "
                        "(keep their handles, or call model.reset_hooks(including_permanent=True)).")
    finally:
        _remove_new_hooks(model, state)


# --------------------------------------------------------------------------------------------------
# compute_salient_logits
# --------------------------------------------------------------------------------------------------


def _salient_case(fn: Callable, w: _World, logits: Tensor, n: int, label: str) -> None:
    model, d_model = w.model, w.model.cfg.d_model
    exp_vecs, exp_info = compute_salient_logits(model, logits, n)
    exp_ids = [info.token_id for info in exp_info]
    exp_strs = [info.str_token for info in exp_info]
    exp_probs = torch.tensor([info.prob for info in exp_info], dtype=torch.float64)
    given = logits.clone()
    out = _run(fn, model, given, n, what="compute_salient_logits")
    _check_unchanged(logits, given, "the logits")
    vecs, info = _items(out, 2, "compute_salient_logits")
    vecs = _tensor(vecs, f"reading_vecs{label}", shape=(n, d_model), device=w.device)
    if not isinstance(info, (list, tuple)) or len(info) != n:
        raise _Fail(f"top_token_info{label} should be a list of {n} SalientToken(str_token, prob, token_id), "
                    f"got {_short(repr(info), 120)}.")
    strs, probs = [], []
    for item in info:
        # A bare (str, prob) pair gets through to the last check, so that other mistakes are named first.
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise _Fail(f"Each entry of top_token_info should be a SalientToken(str_token, prob, token_id), "
                        f"got {item!r}.")
        if not isinstance(item[0], str):
            raise _Fail(f"Token strings should be str (model.tokenizer.decode(...)), got {type(item[0]).__name__}.")
        strs.append(item[0])
        probs.append(_float(item[1], "Each probability in top_token_info"))
    probs_t = torch.tensor(probs, dtype=torch.float64)

    W_U = model.W_U.detach()
    last = logits[0, -1].detach().double()

    def demeaned(ids: Tensor | list) -> Tensor:
        return (W_U[:, list(ids)] - W_U.mean(dim=-1, keepdim=True)).T

    def top(scores: Tensor, largest: bool = True) -> list[int]:
        return scores.topk(n, largest=largest).indices.tolist()

    # Near-ties (e.g. in bfloat16) may order or pick the top tokens differently: accept any pick whose
    # probabilities match the top ones, and hold the rest of the answer to that pick.
    ref_probs = logits[0, -1].detach().float().softmax(dim=-1)
    by_str = {}
    for i in ref_probs.topk(min(n + 10, ref_probs.numel())).indices.tolist():
        by_str.setdefault(model.tokenizer.decode([i]), i)
    picked = [by_str.get(t) for t in strs]
    if None not in picked and picked != exp_ids and len(set(picked)) == n:
        if _close(ref_probs[picked].double().cpu(), exp_probs, max(w.tol, 1e-5)):
            exp_ids, exp_strs = picked, list(strs)
            exp_probs = ref_probs[picked].double().cpu()
            exp_vecs = (W_U[:, picked] - W_U.mean(dim=-1, keepdim=True)).T

    if not _close(vecs, exp_vecs, w.tol):
        hint = _diagnose(vecs, [
            ("your reading vectors are not demeaned: subtract W_U.mean(dim=-1), the mean unembedding over the "
             "vocabulary, from each chosen column", lambda: W_U[:, exp_ids].T),
            ("you demeaned over the wrong axis: subtract the mean over the vocabulary, W_U.mean(dim=-1) (one "
             "d_model vector), not the mean over d_model", lambda: (W_U[:, exp_ids] - W_U[:, exp_ids].mean(dim=0)).T),
            ("subtract the mean over the whole vocabulary, not just over the chosen tokens",
             lambda: W_U[:, exp_ids].T - W_U[:, exp_ids].T.mean(dim=0)),
            ("you read the prediction at position 0 (logits[0, 0]); the next token is predicted at the last "
             "position: use logits[0, -1]", lambda: demeaned(top(logits[0, 0].double()))),
            ("you took the softmax over the wrong dimension: take it over the vocabulary (dim=-1) of logits[0, -1]",
             lambda: demeaned(top(logits.double().softmax(dim=1)[0, -1]))),
            ("you picked the least likely tokens: take the n_output_nodes most probable ones (topk)",
             lambda: demeaned(top(last, largest=False))),
            ("the reading vectors come back in a different order: keep the order of decreasing probability",
             lambda: demeaned(sorted(exp_ids))),
        ], w.tol)
        raise _Fail(hint or f"reading_vecs{label} differ from the demeaned unembeddings W_U[:, v] - W_U.mean(-1) of "
                            f"the top tokens {exp_strs}, {_worst(vecs, exp_vecs, 'reading_vecs')}.")
    if strs != exp_strs:
        raise _Fail(f"The token strings should be model.tokenizer.decode([token_id]) of the chosen tokens, most "
                    f"probable first: expected {exp_strs}, got {strs}.")
    if not _close(probs_t, exp_probs, max(w.tol, 1e-5)):
        hint = _diagnose(probs_t, [
            ("you returned logits, not probabilities: apply softmax over the vocabulary", lambda: last[exp_ids]),
            ("you returned log-probabilities: return probabilities (softmax, not log_softmax)",
             lambda: last.log_softmax(-1)[exp_ids]),
            ("you took the softmax over the wrong dimension: take it over the vocabulary (dim=-1) of logits[0, -1]",
             lambda: logits.double().softmax(dim=1)[0, -1][exp_ids]),
            ("you took the softmax over the wrong dimension (the batch dim makes every probability 1): use the "
             "vocabulary dim, -1", lambda: logits.double().softmax(dim=0)[0, -1][exp_ids]),
        ], w.tol)
        raise _Fail(hint or f"The probabilities{label} should be softmax(logits[0, -1])[token]: expected "
                            f"{_fmt(exp_probs)}, got {_fmt(probs_t)}.")
    # The token ids: the logit nodes, the dashboard and the Neuronpedia export identify each output by its id.
    for item, exp_id in zip(info, exp_ids):
        if len(item) != 3:
            raise _Fail(f"Return each token as SalientToken(str_token, prob, token_id), not the pair "
                        f"{item!r}: the logit nodes take their token id from it, and the exports name each "
                        "output by it.")
        token_id = _int(item[2], f"The token_id of {item[0]!r}")
        if token_id != exp_id:
            raise _Fail(f"The token_id of {item[0]!r} should be its index in the vocabulary, {exp_id} (an "
                        f"index from topk), got {token_id}.")


@_public_test("compute_salient_logits")
def _test_salient(fn: Callable, w: _World) -> None:
    """Top tokens at the last position, their probabilities and demeaned unembeddings."""
    _salient_case(fn, w, w.logits, 3, "")
    _salient_case(fn, w, w.logits, 1, " (n_output_nodes=1)")
    gen = torch.Generator().manual_seed(0)
    made = (4 * torch.randn(1, 6, w.model.cfg.d_vocab, generator=gen)).to(w.logits.device)  # float32: no ties
    _salient_case(fn, w, made, 5, " (hand-made logits, n_output_nodes=5)")


# --------------------------------------------------------------------------------------------------
# build_embedding_nodes
# --------------------------------------------------------------------------------------------------


def _resid_after_block0(model: Any, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    return cache["blocks.0.hook_resid_post"][0]


def _embedding_case(fn: Callable, w: _World, cache: Any, tokens: Tensor, label: str) -> None:
    model, d_model, seq = w.model, w.model.cfg.d_model, tokens.shape[1]
    out = _run(fn, model, cache, tokens, what="build_embedding_nodes")
    nodes, writing, reading = _items(out, 3, "build_embedding_nodes")
    nodes = _list(nodes, f"nodes{label}")
    if len(nodes) != seq:
        raise _Fail(f"You returned {len(nodes)} embedding nodes{label} for {seq} tokens: one embedding node per "
                    "position, <bos> included.")
    writing = _list(writing, f"writing_vecs{label}", seq)
    reading = _list(reading, f"reading_vecs{label}", seq)
    ids = tokens[0].tolist()
    for pos, node in enumerate(nodes):
        what = f"Embedding node {pos}{label}"
        if _ntype(node) != "embedding":
            raise _Fail(f"{what} has node_type {_node_attr(node, 'node_type', what)}, expected NodeType.EMBEDDING.")
        if _node_attr(node, "layer", what) != "E":
            raise _Fail(f'{what} has layer {node.layer!r}; embedding nodes have layer "E".')
        if _node_number(node, "ctx_idx", what, int) != pos:
            raise _Fail(f"{what} has ctx_idx {node.ctx_idx!r}, expected its position {pos}.")
        feature = _node_number(node, "feature", what, int)
        if feature != ids[pos]:
            extra = " (that is the position: `feature` holds the token id)" if feature == pos else ""
            raise _Fail(f"{what} has feature {feature!r}, expected the token id {ids[pos]}{extra}.")
        if _node_attr(node, "str_token", what) != model.tokenizer.decode([ids[pos]]):
            raise _Fail(f"{what} has str_token {node.str_token!r}, expected "
                        f"{model.tokenizer.decode([ids[pos]])!r} (model.tokenizer.decode([token_id])).")
    W = _stack(writing, f"writing_vecs{label}", d_model, w.device)
    R = _stack(reading, f"reading_vecs{label}", d_model, w.device)
    exp = cache["blocks.0.hook_resid_pre"][0].detach()
    if not _close(W, exp, w.tol):
        hint = _diagnose(W, [
            ("you indexed W_E by position; index it by token id (W_E[tokens[0]]), or simply use "
             "cache['blocks.0.hook_resid_pre'][0]", lambda: model.W_E.detach()[: len(ids)]),
            ("you scaled the embeddings by sqrt(d_model), but TransformerLens already folds Gemma's scale into "
             "W_E, so they are scaled twice: use cache['blocks.0.hook_resid_pre'][0] as it is",
             lambda: exp * d_model**0.5),
            ("your writing vectors are the residual stream after block 0; an embedding node writes what enters "
             "block 0: cache['blocks.0.hook_resid_pre'][0]", lambda: _resid_after_block0(model, tokens)),
            ("your writing vectors are zeros: each embedding node writes its embedding, "
             "cache['blocks.0.hook_resid_pre'][0, pos]", lambda: torch.zeros_like(exp)),
        ], w.tol)
        raise _Fail(hint or f"writing_vecs{label} should be cache['blocks.0.hook_resid_pre'][0], "
                            f"{_worst(W, exp, 'writing')}.")
    if R.abs().max() > 0:
        hint = " (they equal the writing vectors)" if _close(R, exp, w.tol) else ""
        raise _Fail(f"Embedding nodes read nothing (they are inputs only): their reading vectors should be zeros{hint}.")


@_public_test("build_embedding_nodes")
def _test_embedding(fn: Callable, w: _World) -> None:
    """One EMBEDDING node per position, writing its scaled embedding, reading nothing."""
    _embedding_case(fn, w, w.cache, w.tokens, "")
    tokens = w.model.to_tokens(format_prompt(*SECOND_PROMPT))
    with torch.no_grad():
        _, cache = w.model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    _embedding_case(fn, w, cache, tokens, " (a second prompt)")


# --------------------------------------------------------------------------------------------------
# build_intermediate_nodes
# --------------------------------------------------------------------------------------------------


def _silent_layer(transcoders: dict, layer: int) -> dict:
    """The same transcoders, except that in `layer` no latent can fire (threshold out of reach)."""
    silent = copy.deepcopy(transcoders[layer])
    with torch.no_grad():
        silent.threshold.fill_(1e9)
    return {**transcoders, layer: silent}


def _intermediate_case(fn: Callable, w: _World, transcoders: dict, start_posn: int, top_k: int, label: str) -> None:
    cache, tokens, d_model = w.cache, w.tokens, w.model.cfg.d_model
    seq = tokens.shape[1]
    tc_hooks = w.tc_hooks(transcoders)
    exp_nodes, _, _, exp_ranges = build_intermediate_nodes(transcoders, cache, tc_hooks, tokens, d_model,
                                                            start_posn, top_k)
    out = _run(fn, transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k,
               what="build_intermediate_nodes",
               hints=[(IndexError, "", "check orientations: W_enc is (d_model, d_sae), so latent f reads W_enc[:, f] "
                                      "(= W_enc.T[f]); W_dec is (d_sae, d_model), so it writes a * W_dec[f]"),
                      (RuntimeError, "size", "check orientations: latent f reads W_enc[:, f] and writes a * W_dec[f]")])
    nodes, writing, reading, ranges = _items(out, 4, "build_intermediate_nodes")
    nodes = _list(nodes, f"nodes{label}")
    writing = _list(writing, f"writing_vecs{label}", len(nodes))
    reading = _list(reading, f"reading_vecs{label}", len(nodes))
    for i, v in enumerate(reading):
        if isinstance(v, Tensor) and v.shape != (d_model,):
            raise _Fail(f"reading_vecs[{i}]{label} has shape {tuple(v.shape)}, expected ({d_model},): the encoder "
                        "direction of latent f is the column W_enc[:, f] (W_enc is (d_model, d_sae)).")
    for i, v in enumerate(writing):
        if isinstance(v, Tensor) and v.shape != (d_model,):
            raise _Fail(f"writing_vecs[{i}]{label} has shape {tuple(v.shape)}, expected ({d_model},): latent f "
                        "writes a * W_dec[f] (W_dec is (d_sae, d_model)).")
    W = _stack(writing, f"writing_vecs{label}", d_model, w.device)
    R = _stack(reading, f"reading_vecs{label}", d_model, w.device)

    # node_range_dict: one contiguous (start, end) block per layer, covering the lists in layer order.
    layers = sorted(transcoders)
    if not isinstance(ranges, dict) or sorted(ranges, key=str) != sorted(exp_ranges, key=str):
        got = sorted(ranges, key=str) if isinstance(ranges, dict) else type(ranges).__name__
        raise _Fail(f"node_range_dict{label} should map each layer index {layers} to its (start, end) slice of the "
                    f"returned lists, got keys {got}.")
    expected_start = 0
    for layer in layers:
        start, end = (_int(v, f"node_range_dict[{layer}]") for v in ranges[layer])
        if start != expected_start or end < start:
            raise _Fail(f"node_range_dict[{layer}] = {ranges[layer]}{label}: the layers' ranges should follow each "
                        f"other with no gaps, so layer {layer} should start at {expected_start}.")
        wrong = [i for i in range(start, min(end, len(nodes))) if getattr(nodes[i], "layer", None) != layer]
        if wrong:
            raise _Fail(f"node_range_dict[{layer}] = {ranges[layer]}{label}, but node {wrong[0]} in that range has "
                        f"layer {getattr(nodes[wrong[0]], 'layer', None)!r}.")
        expected_start = end
    if expected_start != len(nodes):
        raise _Fail(f"node_range_dict{label} covers {expected_start} nodes but you returned {len(nodes)}.")

    # Positions.
    positions = sorted({_node_number(n, "ctx_idx", "Each node", int) for n in nodes})
    want = list(range(start_posn, seq))
    if positions != want:
        span = f"{positions[0]}..{positions[-1]}" if positions else "nothing"
        if positions == list(range(START_POSN, seq)) and start_posn != START_POSN:
            hint = f"use the start_posn argument ({start_posn} here), not a hard-coded {START_POSN}"
        elif positions in (list(range(start_posn + 1, seq)), list(range(start_posn - 1, seq)),
                           list(range(start_posn, seq - 1))):
            hint = "off by one"
        else:
            hint = "check your position loop"
        raise _Fail(f"Intermediate nodes{label} should cover positions start_posn..seq_len-1 = {start_posn}..{seq - 1}; "
                    f"yours cover {span} ({hint}).")

    # Match nodes to the reference by (layer, position, latent) - order within a layer is free.
    def key(n: Any) -> tuple:
        kind = _ntype(n)
        if kind not in ("latent", "mlp_error"):
            raise _Fail("Intermediate nodes should be LATENT or MLP_ERROR nodes; found node_type "
                        f"{_node_attr(n, 'node_type', 'Each node')!r}.")
        what = f"A {kind} node{label}"
        feature = _node_number(n, "feature", what, int) if kind == "latent" else None
        if kind == "latent":
            _node_number(n, "activation", what, float)
        return (_node_attr(n, "layer", what), _node_number(n, "ctx_idx", what, int), kind, feature)

    mine: dict[tuple, int] = {}
    for i, n in enumerate(nodes):
        k = key(n)
        if k in mine:
            what = "MLP_ERROR node" if k[2] == "mlp_error" else f"latent {k[3]}"
            raise _Fail(f"Layer {k[0]}, position {k[1]}{label} has more than one {what}: one error node per (layer, "
                        "position), and each latent at most once.")
        mine[k] = i
    got_latents: dict[tuple, set] = {}
    exp_latents: dict[tuple, list] = {}
    for k in mine:
        if k[2] == "latent":
            got_latents.setdefault(k[:2], set()).add(k[3])
    for k in map(key, exp_nodes):
        if k[2] == "latent":
            exp_latents.setdefault(k[:2], []).append(k[3])
    acts = tc_hooks.transcoder_acts
    for layer in layers:
        for pos in want:
            if (layer, pos, "mlp_error", None) not in mine:
                raise _Fail(f"There is no MLP_ERROR node at layer {layer}, position {pos}{label}: add one error node "
                            "per (layer, position), after that position's latents.")
            got_f = got_latents.get((layer, pos), set())
            exp_f = exp_latents.get((layer, pos), [])
            if got_f == set(exp_f):
                continue
            a = acts[layer][0, pos]
            valid = [f for f in got_f if isinstance(f, int) and 0 <= f < a.shape[0]]
            if len(valid) == len(got_f) == len(exp_f) and torch.equal(a[valid].sort().values, a[exp_f].sort().values):
                continue  # a different pick among exactly tied activations is just as right
            extra = got_f - set(exp_f)
            if extra and len(valid) == len(got_f) and all(a[f] <= 0 for f in extra):
                raise _Fail(f"You kept latents with zero activation (layer {layer}, position {pos}{label}: latents "
                            f"{sorted(extra)[:5]}): keep the top_k latents with activation > 0, fewer if fewer fire.")
            firing = int((a > 0).sum())
            raise _Fail(f"At layer {layer}, position {pos}{label} you kept latents {sorted(got_f)}, expected the "
                        f"top_k={top_k} most active (of {firing} that fire): {exp_f}.")

    # The expected vectors, from the definitions, for the latents you kept (the reference's, up to ties).
    lat = sorted(k for k in mine if k[2] == "latent")
    errs = sorted(k for k in mine if k[2] == "mlp_error")
    act_of = {k: acts[k[0]][0, k[1], k[3]].double() for k in lat}

    def dec_row(layer: int, f: int) -> Tensor:  # one row at a time: a real model's W_dec is large
        return transcoders[layer].W_dec[f].detach().double()

    if lat:
        i_mine = [mine[k] for k in lat]
        got_a = torch.tensor([_float(nodes[i].activation, "Each latent's activation") for i in i_mine],
                             dtype=torch.float64)
        exp_a = torch.stack([act_of[k] for k in lat]).cpu()
        if not _close(got_a, exp_a, max(w.tol, 1e-6)):
            raise _Fail(f"Latent activations{label} should be transcoder_acts[layer][0, pos, f], "
                        f"{_worst(got_a, exp_a, 'activation')}.")
        enc = torch.stack([transcoders[k[0]].W_enc[:, k[3]].detach().double() for k in lat])
        dec = torch.stack([dec_row(k[0], k[3]) for k in lat])
        a_col = exp_a.to(dec.device).unsqueeze(-1)
        got_w, exp_wl = W[i_mine], a_col * dec
        if not _close(got_w, exp_wl, w.tol):
            hint = _diagnose(got_w, [
                ("your latent writing vectors are not scaled by the activation: write a * W_dec[f]", lambda: dec),
                ("your latent writing vectors use the encoder; a latent writes its decoder row, a * W_dec[f]",
                 lambda: a_col * enc),
            ], w.tol)
            raise _Fail(hint or f"Latent writing vectors{label} should be a * W_dec[f], {_worst(got_w, exp_wl)}.")
        got_r = R[i_mine]
        if not _close(got_r, enc, w.tol):
            hint = _diagnose(got_r, [
                ("your latent reading vectors use the decoder; a latent reads its encoder direction W_enc[:, f]",
                 lambda: dec),
                ("your latent reading vectors are scaled by the activation; read the plain encoder direction "
                 "W_enc[:, f]", lambda: a_col * enc),
            ], w.tol)
            raise _Fail(hint or f"Latent reading vectors{label} should be W_enc[:, f], {_worst(got_r, enc)}.")

    # Error nodes: compare with the definition and with the usual wrong versions of the error.
    def per_error(get: Callable[[int, int], Tensor]) -> Tensor:
        return torch.stack([get(k[0], k[1]).double() for k in errs])

    def kept_sum(layer: int, pos: int) -> Tensor:
        total = torch.zeros(d_model, dtype=torch.float64, device=w.device)
        for f in got_latents.get((layer, pos), ()):
            total = total + act_of[(layer, pos, "latent", f)] * dec_row(layer, f)
        return total

    i_mine = [mine[k] for k in errs]
    got_e = W[i_mine]
    mlp = per_error(lambda lt, p: cache[transcoders[lt].cfg.metadata.hook_name_out][0, p])
    skip = per_error(lambda lt, p: tc_hooks.skip_output[lt][0, p])
    b_dec = per_error(lambda lt, p: transcoders[lt].b_dec.detach())
    kept = per_error(kept_sum)
    exp_e = mlp - kept - b_dec - skip
    if not _close(got_e, exp_e, w.tol):
        dec = per_error(lambda lt, p: tc_hooks.transcoder_output[lt][0, p])
        hint = _diagnose(got_e, [
            ("your error node is mlp_out - transcoder_output (= mlp_out - decode(acts)): that leaves the skip term "
             "in the error although the linear skip path already carries it, so it is counted twice, and it drops "
             "the latents outside the top_k. Use mlp_out - (kept latents' a * W_dec + b_dec + "
             "tc_hooks.skip_output[layer])", lambda: mlp - dec),
            ("your error node subtracts every active latent (decode(acts)); subtract only the latents kept as nodes, "
             "so the others are folded into the error", lambda: mlp - dec - skip),
            ("your error node forgets the skip term: subtract tc_hooks.skip_output[layer] too (the linear skip path "
             "already carries it)", lambda: mlp - kept - b_dec),
            ("your error node forgets b_dec: subtract the decoder bias too", lambda: mlp - kept - skip),
            ("your error node forgets b_dec and the skip term: error = mlp_out - (kept latents + b_dec + skip)",
             lambda: mlp - kept),
            ("your error node is the whole MLP output: subtract the kept latents, b_dec and the skip term",
             lambda: mlp),
        ], w.tol)
        raise _Fail(hint or f"MLP error writing vectors{label} should be mlp_out - (kept latents' a * W_dec + b_dec + "
                            f"skip), {_worst(got_e, exp_e, 'error')}.")
    if R[i_mine].abs().max() > 0:
        raise _Fail("MLP error nodes read nothing: their reading vectors should be zeros.")


@_public_test("build_intermediate_nodes")
def _test_intermediate(fn: Callable, w: _World) -> None:
    """Top-k latents (a > 0) and one error node per (layer, position), with their vectors."""
    _intermediate_case(fn, w, w.transcoders, w.start_posn, w.top_k, "")
    _intermediate_case(fn, w, w.transcoders, w.start_posn + 2, 40, " (start_posn=6, top_k=40)")
    if w.toy:  # a copy of one transcoder: cheap here, a few hundred MB on a real model
        _intermediate_case(fn, w, _silent_layer(w.transcoders, 1), w.start_posn, 3,
                           " (no latent fires in layer 1, top_k=3)")


# --------------------------------------------------------------------------------------------------
# prepare_backward_batches
# --------------------------------------------------------------------------------------------------


def _hand_graph() -> GraphNodes:
    """E: 3 nodes, layer 0: 2, layer 1: none, layer 2: 3, one logit; d_model = 4."""
    gen = torch.Generator().manual_seed(1)
    spec = [("E", NodeType.EMBEDDING, p) for p in range(3)] + [(0, NodeType.LATENT, 1), (0, NodeType.MLP_ERROR, 1)]
    spec += [(2, NodeType.LATENT, 1), (2, NodeType.LATENT, 2), (2, NodeType.MLP_ERROR, 2), ("L", NodeType.LOGIT, 2)]
    nodes = [NodeInfo(t, layer, pos, i) for i, (layer, t, pos) in enumerate(spec)]
    ranges = {"E": (0, 3), 0: (3, 5), 1: (5, 5), 2: (5, 8), "L": (8, 9)}
    return GraphNodes(nodes=nodes, writing_vecs=torch.randn(9, 4, generator=gen),
                      reading_vecs=torch.randn(9, 4, generator=gen), node_range_dict=ranges, seq_len=3, n_layers=3)


def _batches_case(fn: Callable, graph: GraphNodes, batch_size: int, label: str) -> None:
    given = _copy_graph(graph)
    out = _run(fn, given, batch_size, what="prepare_backward_batches")
    _check_unchanged(graph.reading_vecs, given.reading_vecs, "graph.reading_vecs")
    if not isinstance(out, (list, tuple)):
        raise _Fail(f"prepare_backward_batches should return a list of batches, got {type(out).__name__}.")
    index_of = {id(n): i for i, n in enumerate(given.nodes)}
    key_of = {i: key for key, (s, e) in graph.node_range_dict.items() for i in range(s, e)}
    d_model = graph.reading_vecs.shape[1]
    device = graph.reading_vecs.device
    seen: list[int] = []
    sizes: dict[Any, list[tuple[int, int]]] = {}
    for b, item in enumerate(out):
        what = f"Batch {b}{label}"
        start, batch_nodes, reading, positions, layers = _items(item, 5, f"{what}: each batch")
        start = _int(start, f"{what}: global_start_idx")
        batch_nodes = list(batch_nodes) if isinstance(batch_nodes, (list, tuple)) else batch_nodes
        if not isinstance(batch_nodes, list):
            raise _Fail(f"{what}: batch_nodes should be a list of NodeInfo, got {type(batch_nodes).__name__}.")
        if not batch_nodes:
            raise _Fail(f"{what} is empty: skip layers that have no nodes.")
        idx = []
        for n in batch_nodes:
            i = index_of.get(id(n))
            if i is None:
                i = next((j for j, m in enumerate(given.nodes) if m == n), None)
            if i is None:
                raise _Fail(f"{what} holds a node that is not in graph.nodes: batch_nodes should be slices of "
                            "graph.nodes.")
            idx.append(i)
        if any(key_of[i] == "E" for i in idx):
            raise _Fail(f"{what} holds embedding nodes: skip the embeddings ('E'), which are "
                        "sources only, never targets.")
        if idx != list(range(idx[0], idx[0] + len(idx))):
            raise _Fail(f"{what}: batch_nodes should be consecutive nodes of graph.nodes, got indices {_fmt(idx)}.")
        keys = {key_of[i] for i in idx}
        if len(keys) > 1:
            raise _Fail(f"{what} mixes nodes of layers {sorted(keys, key=str)}: each batch must hold nodes of a "
                        "single layer (use graph.node_range_dict to walk the layers).")
        key = keys.pop()
        layer_start = graph.node_range_dict[key][0]
        if start != idx[0]:
            extra = (" - that is its offset within the layer; add the layer's start index"
                     if start == idx[0] - layer_start else "")
            raise _Fail(f"{what}: global_start_idx is {start}, but its first node is graph.nodes[{idx[0]}]{extra}. "
                        "global_start_idx is the index in the whole node list.")
        if len(idx) > batch_size:
            raise _Fail(f"{what} has {len(idx)} nodes, more than batch_size={batch_size}.")
        reading = _tensor(reading, f"{what}: reading_vecs", shape=(len(idx), d_model), device=device)
        if not torch.allclose(reading.to(graph.reading_vecs.dtype), graph.reading_vecs[idx]):
            raise _Fail(f"{what}: reading_vecs should be graph.reading_vecs[{idx[0]}:{idx[-1] + 1}], the reading "
                        "vectors of the batch's own nodes.")
        if isinstance(positions, (list, tuple)):
            raise _Fail(f"{what}: positions should be a tensor (torch.tensor([n.ctx_idx for n in batch_nodes])), "
                        f"got a {type(positions).__name__}.")
        positions = _tensor(positions, f"{what}: positions", shape=(len(idx),), device=device, floating=False)
        if positions.tolist() != [graph.nodes[i].ctx_idx for i in idx]:
            raise _Fail(f"{what}: positions should be the nodes' ctx_idx {[graph.nodes[i].ctx_idx for i in idx]}, "
                        f"got {positions.tolist()}.")
        if list(layers) != [graph.nodes[i].layer for i in idx]:
            raise _Fail(f"{what}: layers should be the nodes' layer entries {[graph.nodes[i].layer for i in idx]}, "
                        f"got {_fmt(list(layers))}.")
        seen += idx
        sizes.setdefault(key, []).append((idx[0], len(idx)))

    targets = [i for i in range(len(graph.nodes)) if key_of.get(i) != "E"]
    if len(seen) != len(set(seen)):
        raise _Fail(f"Some nodes{label} appear in more than one batch: every target exactly once.")
    missing = sorted(set(targets) - set(seen))
    if missing:
        if all(key_of[i] == "L" for i in missing):
            raise _Fail(f"The logit nodes{label} are in no batch: logit nodes ('L') are targets too.")
        raise _Fail(f"{len(missing)} target nodes{label} are in no batch (e.g. graph.nodes[{missing[0]}], layer "
                    f"{key_of[missing[0]]!r}): every node except the embeddings is a target.")
    for key, chunks in sizes.items():
        lengths = [n for _, n in sorted(chunks)]
        if any(n != batch_size for n in lengths[:-1]):
            raise _Fail(f"Layer {key!r}{label} is split into batches of {lengths}: split each layer into consecutive "
                        f"chunks of batch_size={batch_size} (only its last chunk may be smaller).")


@_public_test("prepare_backward_batches")
def _test_batches(fn: Callable, w: _World) -> None:
    """Per-layer batches of every target, with their global start index, vectors, positions and layers."""
    for batch_size in (8, 7, 10_000):
        _batches_case(fn, w.graph, batch_size, f" (batch_size={batch_size})")
    _batches_case(fn, _hand_graph(), 2, " (a hand-made graph with an empty layer, batch_size=2)")


# --------------------------------------------------------------------------------------------------
# compute_adjacency_matrix
# --------------------------------------------------------------------------------------------------


def _second_adjacency_case(w: _World) -> tuple[GraphNodes, list, int, Tensor]:
    """Another start_posn (6) and top_k (2) on the same prompt, so hard-coded values show up."""
    if "adjacency2" not in w.extra:
        start = w.start_posn + 2
        tc_hooks = w.tc_hooks()
        reading, info = compute_salient_logits(w.model, w.logits, 2)
        graph = build_graph_nodes(w.model, w.transcoders, w.cache, tc_hooks, reading, info, w.tokens, start, 2)
        batches = _subset(w, prepare_backward_batches(graph, 16 if w.toy else w.batch_size))
        w.extra["adjacency2"] = (graph, batches, start, _reference_adjacency(w, graph, batches, start))
    return w.extra["adjacency2"]


def _adjacency_case(fn: Callable, w: _World, graph: GraphNodes, batches: list, start_posn: int, expected: Tensor,
                    label: str) -> None:
    model, n = w.model, len(graph.nodes)
    given = _copy_graph(graph)
    given_batches = [(s, list(nodes), r.clone(), p.clone(), list(layers)) for s, nodes, r, p, layers in batches]
    tc_hooks = w.tc_hooks()
    state = _hook_state(model)
    try:
        A = _run(fn, model, w.tokens, given, w.freeze, tc_hooks, given_batches, start_posn,
                 what="compute_adjacency_matrix",
                 hints=[(KeyError, "hook_resid_post", "setup_attribution returns gradients at blocks.0.hook_resid_pre "
                                                      "and blocks.{l}.hook_mlp_out (which equals the gradient at "
                                                      "hook_resid_post): latents and errors of layer l write at "
                                                      "hook_mlp_out")])
        leaked = _new_hooks(model, state)
    finally:
        if tc_hooks.installed:
            tc_hooks.remove()
        _remove_new_hooks(model, state)
    if leaked:
        raise _Fail(f"Your function left {leaked} hooks on the model: call tc_hooks.remove() once the backward "
                    "passes are done (also when they fail: use try/finally).")
    _check_unchanged(graph.writing_vecs, given.writing_vecs, "graph.writing_vecs")
    _check_unchanged(graph.reading_vecs, given.reading_vecs, "graph.reading_vecs")
    A = _tensor(A, f"The adjacency matrix{label}", shape=(n, n), device=w.device)
    if _close(A, expected, w.tol):
        return

    tol = max(w.tol, _tolerance(A.dtype))  # `a` below is float64: keep the tolerance of the learner's dtype
    a, e = A.double().cpu(), expected.double().cpu()
    bad = _bad(a, e, tol)
    key_of = [key for key, (s, t) in graph.node_range_dict.items() for _ in range(s, t)]
    masked = torch.tensor([nd.ctx_idx < start_posn and nd.layer != "L" for nd in graph.nodes])
    if _close(a, e.T, tol):
        raise _Fail(f"Edge weights{label} come back transposed: A[j, i] is the edge from i to j (row = target, "
                    "column = source).")
    if a.abs().max() == 0:
        raise _Fail(f"Your adjacency matrix{label} is all zeros: for each batch, write the edge weights into rows "
                    "global_start_idx : global_start_idx + len(batch_nodes).")
    if _close(a, -e, tol):
        raise _Fail(f"Your edge weights{label} have the wrong sign.")
    if bad[:, masked].any() and not bad[:, ~masked].any():
        raise _Fail(f"Edges from sources at positions < start_posn (={start_posn}){label} must be zero: mask the "
                    f"chat-template prefix ({_worst(a[:, masked], e[:, masked], 'A[:, masked]')}).")
    free = _reference_adjacency(w, graph, batches, start_posn, _NoSkipHooks())
    if _close(a, free, tol):
        raise _Fail(f"Your edges{label} match gradients through the real MLPs: install the transcoder hooks "
                    "(tc_hooks.install()) before calling setup_attribution, and remove them afterwards.")
    zero_rows = [i for i in range(n) if a[i].abs().max() == 0 and e[i].abs().max() > 0]
    if zero_rows:
        raise _Fail(f"{len(zero_rows)} rows{label} are all zero but should not be (e.g. row {zero_rows[0]}, a "
                    f"{_ntype(graph.nodes[zero_rows[0]])} target): fill rows global_start_idx + b for every batch.")
    bad_src = {key_of[i] for i in range(n) if bad[:, i].any()}
    bad_tgt = {key_of[j] for j in range(n) if bad[j].any()}
    j, i = (int(v) for v in torch.unravel_index((a - e).abs().argmax(), a.shape))
    example = f"A[{j}, {i}] = {a[j, i].item():.4g}, expected {e[j, i].item():.4g}"
    if "E" not in bad_src:
        hint = ("edges from embeddings are right, but not those from latents and errors: a source in layer l writes "
                "at blocks.{l}.hook_mlp_out, so use that gradient at the source's own position (ctx_idx)")
    elif bad_src == {"E"}:
        hint = ("edges from latents and errors are right, but not those from embeddings: they write at "
                "blocks.0.hook_resid_pre, so use that gradient at the embedding's position")
    else:
        hint = "check which gradient you contract with which writing vector, and at which position"
    raise _Fail(f"Edge weights{label} differ from the reference ({example}; wrong edges from sources in "
                f"{sorted(bad_src, key=str)} into targets in {sorted(bad_tgt, key=str)}): {hint}.")


@_public_test("compute_adjacency_matrix")
def _test_adjacency(fn: Callable, w: _World) -> None:
    """Every edge A[target, source] of the graph, compared with the reference backward passes."""
    _adjacency_case(fn, w, w.graph, w.batches, w.start_posn, w.adjacency, "")
    graph, batches, start, expected = _second_adjacency_case(w)
    _adjacency_case(fn, w, graph, batches, start, expected, f" (start_posn={start}, top_k=2)")


# --------------------------------------------------------------------------------------------------
# Influence and pruning: hand-made graphs and known-wrong variants
# --------------------------------------------------------------------------------------------------


def _graph_from_edges(n: int, edges: dict[tuple[int, int], float]) -> Tensor:
    """A[target, source] from {(source, target): weight}."""
    A = torch.zeros(n, n)
    for (src, tgt), weight in edges.items():
        A[tgt, src] = weight
    return A


def _chain() -> tuple[Tensor, Tensor, int]:
    """embedding -> latent -> logit: two edges (one negative), one layer."""
    return _graph_from_edges(3, {(0, 1): 2.0, (1, 2): -3.0}), torch.tensor([0.5]), 1


def _zero_row_graph() -> tuple[Tensor, Tensor, int]:
    """Node 2 is a latent with no inputs (an all-zero row) that still feeds later nodes."""
    edges = {(0, 3): -2.0, (2, 3): 1.0, (3, 4): 1.0, (2, 4): 3.0, (1, 4): 0.5}
    return _graph_from_edges(5, edges), torch.tensor([0.8]), 2


def _two_logit_graph() -> tuple[Tensor, Tensor, int]:
    edges = {(0, 2): 1.0, (1, 2): -2.0, (2, 3): 1.5, (1, 3): 0.5, (3, 4): 2.0, (2, 4): -1.0, (2, 5): 1.0, (0, 5): 0.25}
    return _graph_from_edges(6, edges), torch.tensor([0.6, 0.3]), 2


def _tie_graph() -> tuple[Tensor, Tensor, int]:
    """Four sources into one logit with shares 1/8, 1/2, 1/8, 1/4: exact in floating point, so threshold 0.75
    is reached exactly after two of them."""
    return _graph_from_edges(5, {(0, 4): 1.0, (1, 4): 4.0, (2, 4): -1.0, (3, 4): 2.0}), torch.tensor([1.0]), 1


def _orphan_graph() -> tuple[Tensor, Tensor, int]:
    """Two embeddings, two layer-0 latents, one layer-1 latent, one logit; at threshold 0.6 edge pruning drops
    every edge of node 1 and node 3, and keeping the edges into the logit needs its weight added back."""
    edges = {(0, 2): 4.0, (1, 2): 1.0, (1, 3): 1.0, (2, 4): 3.0, (3, 4): 1.0, (4, 5): 6.0, (2, 5): 1.0, (3, 5): 1.0}
    return _graph_from_edges(6, edges), torch.tensor([1.0]), 2


def _influence_variant(A: Tensor, w: Tensor, n_layers: int, *, terms: int | None = None, k0: bool = False,
                       norm: str = "rows") -> Tensor:
    """compute_influence, with the usual mistakes switchable."""
    A = A.double()
    if norm == "rows":
        B = normalize_matrix(A)
    elif norm == "cols":
        B = A.abs() / A.abs().sum(0, keepdim=True).clamp(min=1e-8)
    elif norm == "signed":
        B = A / A.sum(1, keepdim=True).clamp(min=1e-8)
    else:
        B = A.abs()
    v = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device)
    v[A.shape[0] - w.shape[0]:] = w.double()
    total = v.clone() if k0 else torch.zeros_like(v)
    for _ in range(n_layers + 1 if terms is None else terms):
        v = v @ B
        total = total + v
    return total


def _influence_case(fn: Callable, A: Tensor, w: Tensor, n_layers: int, tol: float, label: str) -> None:
    A_in, w_in = A.clone(), w.clone()
    out = _run(fn, A_in, w_in, n_layers, what="compute_influence")
    _check_unchanged(A, A_in, "the adjacency matrix")
    _check_unchanged(w, w_in, "logit_weights")
    got = _tensor(out, f"The influence{label}", shape=(A.shape[0],), device=A.device,
                  nan_hint="A node with no inputs has an all-zero row of A: clamp the row sums before dividing, as "
                           "normalize_matrix does.")
    expected = compute_influence(A, w, n_layers)
    if _close(got, expected, tol):
        return
    if got.abs().max() == 0:
        # Both mistakes give exactly zero on any graph whose first nodes have no inputs and whose logits feed nothing.
        raise _Fail(f"Your influence{label} is all zeros: put the logit weights on the LAST n_logit nodes (the logit "
                    "nodes come last) and propagate from targets back to sources with v @ B, not B @ v.")
    hint = _diagnose(got.double().cpu(), [
        ("you included the starting vector (the k = 0 term of the series), so logit nodes get their own weight: "
         "start the sum at v @ B", lambda: _influence_variant(A, w, n_layers, k0=True)),
        ("too few power-series terms: sum n_layers + 1 powers, v @ B + v @ B^2 + ... + v @ B^(n_layers+1), since a "
         "path can have n_layers + 1 edges (embedding -> layer 0 -> ... -> logit)",
         lambda: _influence_variant(A, w, n_layers, terms=n_layers)),
        ("too few power-series terms: sum n_layers + 1 powers", lambda: _influence_variant(A, w, n_layers,
                                                                                          terms=n_layers - 1)),
        ("you did not normalise: use B = |A| with each row divided by its sum (normalize_matrix(A))",
         lambda: _influence_variant(A, w, n_layers, norm="none")),
        ("take absolute values before normalising: B = |A| / row sums of |A| (normalize_matrix)",
         lambda: _influence_variant(A, w, n_layers, norm="signed")),
        ("you normalised columns: normalise each row (a target's incoming weights sum to 1), i.e. normalize_matrix",
         lambda: _influence_variant(A, w, n_layers, norm="cols")),
    ], tol)
    raise _Fail(hint or f"The influence{label} differs from w B + w B^2 + ... (B the row-normalised |A|), "
                        f"{_worst(got, expected, 'influence')}.")


@_public_test("compute_influence")
def _test_influence(fn: Callable, w: _World) -> None:
    """Influence by the Neumann series on the row-normalised |A|, on the toy graph and hand-made ones."""
    # float32 whatever the model's dtype: the exercise is about the series, not about bfloat16 round-off.
    _influence_case(fn, w.adjacency.float(), w.logit_weights.float(), w.n_layers, 1e-5, f" ({w.name})")
    tol = 1e-5
    for label, (A, weights, n_layers) in [(" (a 3-node chain)", _chain()),
                                         (" (a graph with an all-zero row)", _zero_row_graph()),
                                         (" (two logit nodes)", _two_logit_graph())]:
        _influence_case(fn, A, weights, n_layers, tol, label)


def _robust_threshold(scores: Tensor, target: float) -> float:
    """A threshold near `target` that sits half-way between two cumulative shares, with clear gaps around it.

    Rounding differences between two correct implementations then cannot change what is kept.
    """
    s = scores.detach().double().flatten().cpu()
    s = s[s > 0].sort(descending=True).values
    if s.numel() < 3:
        return target
    share = s.cumsum(0) / s.sum()
    cross = int((share < target).sum())  # index of the item that crosses `target`
    order = sorted(range(1, s.numel() - 1), key=lambda k: abs(k - cross))
    for k in order:  # keep items 0..k
        if (s[k] - s[k + 1]) > 1e-3 * s[k] and s[k] / s.sum() > 1e-4:
            return float((share[k - 1] + share[k]) / 2)
    return target


def _prune_nodes_variant(A: Tensor, w: Tensor, n_layers: int, threshold: float, *, shift: int = 0,
                         strict: bool = False, ascending: bool = False, keep_logits: bool = True) -> list[int]:
    n, n_logits = A.shape[0], w.shape[0]
    influence = compute_influence(A.double(), w.double(), n_layers)[: n - n_logits]
    order = influence.argsort(descending=not ascending)
    share = influence[order].cumsum(0) / influence.sum()
    count = int((share <= threshold).sum() if strict else (share < threshold).sum()) + 1 + shift
    kept = set(order[: max(count, 0)].tolist())
    if keep_logits:
        kept |= set(range(n - n_logits, n))
    return sorted(kept)


def _prune_check(kept: Any, pruned: Any, A: Tensor, w: Tensor, what: str) -> tuple[list[int], Tensor]:
    """Type checks shared by both pruning tests."""
    if isinstance(kept, (list, tuple)):
        raise _Fail(f"kept_indices{what} should be a 1-D integer tensor, got a {type(kept).__name__}.")
    kept = _tensor(kept, f"kept_indices{what}", device=A.device, floating=False)
    if kept.dim() != 1:
        raise _Fail(f"kept_indices{what} should be 1-D, got shape {tuple(kept.shape)}.")
    pruned = _tensor(pruned, f"pruned_matrix{what}", device=A.device)
    k = kept.numel()
    if tuple(pruned.shape) != (k, k):
        raise _Fail(f"pruned_matrix{what} has shape {tuple(pruned.shape)}, expected ({k}, {k}): restrict both rows "
                    "and columns to the kept nodes, A[kept][:, kept].")
    n, n_logits = A.shape[0], w.shape[0]
    got = kept.tolist()
    if not set(range(n - n_logits, n)) <= set(got):
        raise _Fail(f"logit nodes must always be kept{what}: indices {list(range(n - n_logits, n))} should be in "
                    f"kept_indices, got {_fmt(got)}.")
    return got, pruned


def _prune_nodes_case(fn: Callable, A: Tensor, w: Tensor, n_layers: int, threshold: float, tol: float,
                      label: str) -> None:
    what = f" ({label}, threshold={threshold:.6g})"
    A_in, w_in = A.clone(), w.clone()
    out = _run(fn, A_in, w_in, n_layers, threshold, what="prune_nodes")
    _check_unchanged(A, A_in, "the adjacency matrix")
    _check_unchanged(w, w_in, "logit_weights")
    kept, pruned = _items(out, 2, "prune_nodes")
    exp_kept, _ = prune_nodes(A, w, n_layers, threshold)
    exp = exp_kept.tolist()
    got, pruned = _prune_check(kept, pruned, A, w, what)
    if sorted(got) != exp:
        variants = [
            ("you stop one node short: keep nodes in order of decreasing influence until the cumulative share "
             "reaches the threshold, including the node that crosses it", dict(shift=-1)),
            ("you keep one node too many: stop as soon as the cumulative share reaches the threshold (>=); at an "
             "exact tie, the node that lands on it is the last one kept", dict(strict=True)),
            ("you keep one node too many: stop as soon as the cumulative share reaches the threshold",
             dict(shift=1)),
            ("you kept the least influential nodes: sort by decreasing influence", dict(ascending=True)),
        ]
        for hint, kwargs in variants:
            if sorted(got) == _prune_nodes_variant(A, w, n_layers, threshold, **kwargs):
                raise _Fail(f"{hint}{what}.")
        influence = compute_influence(A, w, n_layers)
        missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
        raise _Fail(f"You keep {len(got)} nodes{what}, expected {len(exp)}: missing {_fmt(missing)} (influence "
                    f"{_fmt(influence[missing])}), extra {_fmt(extra)} (influence {_fmt(influence[extra])}).")
    if got != exp:
        raise _Fail(f"kept_indices{what} should be sorted in the original node order (torch.sort them), got "
                    f"{_fmt(got)}.")
    if not _close(pruned, A[exp][:, exp], tol):
        raise _Fail(f"pruned_matrix{what} should be A[kept][:, kept], {_worst(pruned, A[exp][:, exp])}.")


@_public_test("prune_nodes")
def _test_prune_nodes(fn: Callable, w: _World) -> None:
    """The fewest nodes holding `threshold` of the influence, plus every logit node, in order."""
    A, weights = w.adjacency.float(), w.logit_weights.float()
    influence = compute_influence(A, weights, w.n_layers)[: A.shape[0] - weights.shape[0]]
    for target in (0.8, 0.5):
        _prune_nodes_case(fn, A, weights, w.n_layers, _robust_threshold(influence, target), 1e-5, w.name)
    A, weights, n_layers = _tie_graph()
    _prune_nodes_case(fn, A, weights, n_layers, 0.75, 1e-6, "a tie at the threshold, one logit node")
    A, weights, n_layers = _two_logit_graph()
    _prune_nodes_case(fn, A, weights, n_layers, 0.6, 1e-6, "two logit nodes")


def _prune_edges_variant(A: Tensor, w: Tensor, n_layers: int, threshold: float, *, add_logits: bool = True,
                         by_target: bool = True, strict: bool = False, orphans: bool = False,
                         zero_dropped: bool = True) -> tuple[list[int], Tensor]:
    n, n_logits = A.shape[0], w.shape[0]
    importance = compute_influence(A.double(), w.double(), n_layers)
    if add_logits:
        importance[n - n_logits:] += w.double()
    B = normalize_matrix(A.double())
    scores = B * (importance[:, None] if by_target else importance[None, :])
    flat = scores.flatten().sort(descending=True).values
    share = flat.cumsum(0) / flat.sum()
    count = min(int((share <= threshold).sum() if strict else (share < threshold).sum()) + 1, flat.numel())
    cutoff = flat[count - 1]
    mask = (scores >= cutoff) & (scores > 0)
    edges = A * mask if zero_dropped else A
    nonzero = (A * mask) != 0
    has = nonzero.any(0) | nonzero.any(1)
    has[n - n_logits:] = True
    kept = list(range(n)) if orphans else torch.where(has)[0].tolist()
    return kept, edges[kept][:, kept]


def _prune_edges_case(fn: Callable, A: Tensor, w: Tensor, n_layers: int, threshold: float, tol: float,
                      label: str) -> None:
    what = f" ({label}, threshold={threshold:.6g})"
    A_in, w_in = A.clone(), w.clone()
    out = _run(fn, A_in, w_in, n_layers, threshold, what="prune_edges")
    _check_unchanged(A, A_in, "the adjacency matrix")
    _check_unchanged(w, w_in, "logit_weights")
    kept, pruned = _items(out, 2, "prune_edges")
    exp_kept, exp_pruned = prune_edges(A, w, n_layers, threshold)
    exp = exp_kept.tolist()
    got, pruned = _prune_check(kept, pruned, A, w, what)
    variants = [
        ("add the logit weights to the logit nodes' influence before scoring edges: otherwise every edge into a "
         "logit node scores 0", dict(add_logits=False)),
        ("score an edge i -> j with its TARGET's importance: score[j, i] = B[j, i] * importance[j]",
         dict(by_target=False)),
        ("you keep one edge too many at an exact tie: stop as soon as the cumulative score reaches the threshold "
         "(>=)", dict(strict=True)),
        ("remove the nodes left without any edge (orphans) after dropping edges; only logit nodes stay regardless",
         dict(orphans=True)),
    ]
    if sorted(got) != exp:
        for hint, kwargs in variants:
            if sorted(got) == _prune_edges_variant(A, w, n_layers, threshold, **kwargs)[0]:
                raise _Fail(f"{hint}{what}.")
        missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
        raise _Fail(f"You keep {len(got)} nodes{what}, expected {len(exp)}: missing {_fmt(missing)}, extra "
                    f"{_fmt(extra)}.")
    if got != exp:
        raise _Fail(f"kept_indices{what} should be sorted in the original node order, got {_fmt(got)}.")
    if not _close(pruned, exp_pruned, tol):
        if _close(pruned, A[exp][:, exp], tol):
            raise _Fail(f"Zero out the edges you drop{what}: pruned_matrix should keep only the surviving edges, "
                        "restricted to the kept nodes.")
        for hint, kwargs in variants[:3]:
            if _close(pruned, _prune_edges_variant(A, w, n_layers, threshold, **kwargs)[1].to(pruned), tol):
                raise _Fail(f"{hint}{what}.")
        raise _Fail(f"pruned_matrix{what} differs: it should be A with the dropped edges zeroed, restricted to the "
                    f"kept nodes, {_worst(pruned, exp_pruned, 'pruned')}.")


@_public_test("prune_edges")
def _test_prune_edges(fn: Callable, w: _World) -> None:
    """Edges scored by normalised weight times target importance, kept up to `threshold`; orphans dropped."""
    A, weights = w.adjacency.float(), w.logit_weights.float()
    node_kept, node_pruned = prune_nodes(A, weights, w.n_layers, 0.8)
    for label, M in ((w.name, A), (f"{w.name} after node pruning", node_pruned)):
        importance = compute_influence(M, weights, w.n_layers)
        importance[M.shape[0] - weights.shape[0]:] += weights
        scores = normalize_matrix(M) * importance[:, None]
        _prune_edges_case(fn, M, weights, w.n_layers, _robust_threshold(scores, 0.85), 1e-5, label)
    A, weights, n_layers = _orphan_graph()
    _prune_edges_case(fn, A, weights, n_layers, 0.6, 1e-6, "a graph whose pruning leaves orphans, one logit node")
    A, weights, n_layers = _tie_graph()
    _prune_edges_case(fn, A, weights, n_layers, 0.75, 1e-6, "a tie at the threshold")
    del node_kept


# The public names the notebook calls (the decorated bodies above are registered under these names).
test_transcoder_replacement_hooks = _test_tc_hooks
test_compute_salient_logits = _test_salient
test_build_embedding_nodes = _test_embedding
test_build_intermediate_nodes = _test_intermediate
test_prepare_backward_batches = _test_batches
test_compute_adjacency_matrix = _test_adjacency
test_compute_influence = _test_influence
test_prune_nodes = _test_prune_nodes
test_prune_edges = _test_prune_edges
