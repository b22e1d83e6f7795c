"""One guard for every public entry point: bad input stops with a clear error before the model runs.

Each entry point (`attribute`, the intervention functions, `AttributionResult.save` / `load`, `prune`) is
declared with `@guarded(...)`, which says what its arguments are; the guard then, on every call:

- takes the model's lock: a second thread on the same model is refused (the runs would read each other's
  hooks), while the thread already inside may call other entry points (`ablation_effects` calls `intervene`);
  meanwhile another thread's plain `model(tokens)` or `model.hooks()` waits until the call ends (`_Gate`),
  and guarded calls on two models that share one tokenizer take turns (a fast tokenizer used by two threads
  at once fails with "Already borrowed");
- checks the model once per outermost call: not a `copy.deepcopy`, not loaded in `inference_mode`, and warns
  naming every hook already on it (they would run during the call and change what it computes);
- checks a prompt's length against `n_ctx` before any forward pass (text and token ids, one prompt or a
  batch of them), and that token ids are whole numbers in the vocabulary: a longer input would make
  TransformerLens grow its rotary and mask buffers for good. Buffers a call replaced anyway are put back: a
  failed call leaves the model bit-identical;
- checks transcoders: one per layer it names, reading and writing that layer's MLP, with finite weights;
- lets an argument declared optional be None: then it is not checked, and a call without its model takes
  no lock (the exports draw a result without one);
- checks numbers strictly: counts and indices with `operator.index` (no `True` for 1, no `3.7` for 3), flags
  as real bools, layer lists as lists (not the string "12"), values finite and within the model's dtype;
- checks a result against the model and transcoders it is used with (`check_result_fits`: names, shapes and
  weight digests), and a `CleanRun` against what it was made from (`check_clean_run_fresh`: the versions of
  the model's, the transcoders' and its own tensors).

`ENTRY_POINTS` lists every guarded function; `tests/test_hostile.py` derives the public functions of every
public module and proves each is guarded or listed there with a reason. The decorator's keywords are `Spec`'s
fields (new fields keep their defaults, so existing declarations stay valid).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from .checks import (
    ExistingHooksWarning,
    _as_transcoder_dict,
    as_count,
    check_context,
    check_some_transcoders,
    check_transcoder,
    existing_hooks,
    foreign_mlp,
)
from .fingerprints import versions, weights_digest

__all__ = [
    "ENTRY_POINTS",
    "ModelBusyError",
    "as_flag",
    "as_index",
    "as_indices",
    "as_layers",
    "as_real",
    "check_clean_run_fresh",
    "check_context",
    "check_interventions",
    "check_latent_nodes",
    "check_result_fits",
    "check_token_input",
    "check_token_rows",
    "clean_run_state",
    "guarded",
    "model_session",
    "world_fingerprint",
]

F = TypeVar("F", bound=Callable[..., Any])

# "module.qualname" -> the guarded function, filled by `@guarded`.
ENTRY_POINTS: dict[str, Callable] = {}


class ModelBusyError(RuntimeError):
    """Another thread is running an entry point on this model."""


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------


def as_index(name: str, value: object, size: int, what: str) -> int:
    """`value` as an int in `[0, size)`; bools, floats and negative indices are refused (`what` names the
    range)."""
    index = as_count(name, value)
    if index >= size:
        raise ValueError(f"{name} = {index} is out of range: {what} (0..{size - 1}).")
    return index


def as_indices(name: str, values: object, size: int, what: str) -> list[int]:
    """A list or tensor of indices, each as `as_index`; a string or a bare number is refused."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, Tensor, Iterator, range)):
        raise TypeError(f"{name} must be a list of whole numbers, got {type(values).__name__} {values!r}.")
    if isinstance(values, Tensor):
        if values.is_floating_point() or values.dtype == torch.bool or values.dim() != 1:
            raise TypeError(
                f"{name} must be a 1-d integer tensor or a list, got {values.dtype} {values.shape}."
            )
        values = values.tolist()
    return [as_index(f"{name}[{i}]", v, size, what) for i, v in enumerate(values)]


def as_flag(name: str, value: object, optional: bool = False) -> bool | None:
    """`value` as a bool: only `True` / `False` (and numpy bools), so `"False"` or `0` cannot pass as one."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    allowed = "True or False (or None)" if optional else "True or False"
    raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}.")


def as_layers(name: str, value: object, n_layers: int) -> list[int] | None:
    """None, or a list of layer numbers (a string such as "12" is refused, not read digit by digit)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"{name} must be a list of layer numbers such as [1, 2], got {type(value).__name__} {value!r}."
        )
    return as_indices(name, list(value), n_layers, f"the model has {n_layers} layers")


def as_real(name: str, value: object, dtype: torch.dtype = torch.float32) -> float:
    """`value` as a finite float that `dtype` can hold (1e39 would be inf in float32)."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} is {number}; set a finite number.")
    limit = torch.finfo(dtype).max if dtype.is_floating_point else torch.finfo(torch.float32).max
    if abs(number) > limit:
        raise ValueError(
            f"{name} = {number:g} is beyond what {dtype} holds (|x| <= {limit:.3g}): it would become inf."
        )
    return number


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def check_token_input(model: Any, prompt_or_tokens: object, name: str = "prompt_or_tokens") -> int:
    """Check text or token ids for one prompt before any forward pass; return its number of tokens."""
    if isinstance(getattr(prompt_or_tokens, "tokens", None), Tensor) and hasattr(prompt_or_tokens, "acts"):
        # A prepared clean pass (interventions.CleanRun): its tokens were checked when it was made.
        if getattr(prompt_or_tokens, "model", model) is not model:
            raise ValueError(
                f"{name} is a clean run made with another model: make one with clean_run(model, ...)."
            )
        check_clean_run_fresh(prompt_or_tokens, name)
        return int(prompt_or_tokens.tokens.shape[-1])
    if isinstance(prompt_or_tokens, (bytes, bytearray)):
        raise TypeError(f"{name} is bytes: pass text ({name}.decode('utf-8')) or token ids.")
    if isinstance(prompt_or_tokens, str):
        if not prompt_or_tokens:
            raise ValueError("The prompt is empty: pass text (format_prompt for chat models) or token ids.")
        n_tokens = model.to_tokens(prompt_or_tokens, truncate=False).shape[1]
        check_context(model, n_tokens, "The prompt")
        return n_tokens
    if isinstance(prompt_or_tokens, Tensor):
        ids = prompt_or_tokens
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(
                f"Pass one prompt as text or token ids: {name} must be an integer tensor of ids, got dtype "
                f"{ids.dtype}."
            )
    elif isinstance(prompt_or_tokens, (list, tuple, range)):
        flat = (
            prompt_or_tokens[0]
            if len(prompt_or_tokens) == 1 and isinstance(prompt_or_tokens[0], (list, tuple))
            else prompt_or_tokens
        )
        ids = torch.tensor(
            [as_count(f"{name}[{i}]", t, minimum=-(1 << 62)) for i, t in enumerate(flat)], dtype=torch.long
        )
    else:
        raise TypeError(
            f"{name} must be text (str) or token ids (a list or integer tensor), got "
            f"{type(prompt_or_tokens).__name__}."
        )
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(
            "Pass one prompt: a string or token ids of shape (seq,) or (1, seq), got shape "
            f"{tuple(ids.shape)}."
        )
    check_context(model, ids.numel(), f"{name}")
    bad = (ids < 0) | (ids >= model.cfg.d_vocab)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{name}[{i}] = {int(ids[i])} is not a token id: ids run 0..{model.cfg.d_vocab - 1} (d_vocab)."
        )
    return ids.numel()


def check_token_rows(model: Any, rows: object, name: str = "tokens") -> None:
    """Check the token ids of several prompts before any forward pass: a 2-d integer tensor `(n_seq, seq)`
    or a list of lists of ids, every row non-empty and within `n_ctx`, every id in the vocabulary."""
    if isinstance(rows, Tensor):
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of token ids, got dtype {rows.dtype}.")
        if rows.dim() != 2 or 0 in rows.shape:
            raise ValueError(
                f"{name} must be token ids of shape (n_seq, seq), one prompt per row, got shape "
                f"{tuple(rows.shape)}."
            )
        table = [rows]
    elif isinstance(rows, (list, tuple)) and rows and all(isinstance(r, (list, tuple)) and r for r in rows):
        table = [
            torch.tensor([as_count(f"{name}[{i}][{j}]", t, minimum=-(1 << 62)) for j, t in enumerate(row)])
            for i, row in enumerate(rows)
        ]
    else:
        raise TypeError(
            f"{name} must be token ids of several prompts: a 2-d integer tensor (n_seq, seq) or a non-empty "
            f"list of non-empty lists of ids, got {type(rows).__name__}."
        )
    check_context(model, max(t.shape[-1] for t in table), f"A row of {name}")
    for k, ids in enumerate(table):
        bad = ((ids < 0) | (ids >= model.cfg.d_vocab)).nonzero()
        if len(bad):
            at = tuple(int(i) for i in bad[0]) if ids.dim() == 2 else (k, int(bad[0, 0]))
            raise ValueError(
                f"{name}{list(at)} = {int(ids[tuple(bad[0])])} is not a token id: ids run "
                f"0..{model.cfg.d_vocab - 1} (d_vocab)."
            )


def clean_run_state(run: Any) -> dict[str, dict[str, tuple]]:
    """What a `CleanRun` was made from and holds, as tensor versions (`fingerprints.versions`): the model's
    and transcoders' parameters, and its own tensors."""
    own = [("tokens", run.tokens)]
    for field_name in ("frozen_values", "mlp_in", "mlp_out", "acts"):
        own += [(f"{field_name}[{key!r}]", t) for key, t in getattr(run, field_name).items()]
    return {
        "the model's weights": versions(run.model.named_parameters()),
        **{
            f"transcoder {layer}'s weights": versions(tc.named_parameters())
            for layer, tc in sorted(run.transcoders.items())
        },
        "its own tensors": versions(own),
    }


def check_clean_run_fresh(run: Any, name: str = "prompt_or_tokens") -> None:
    """Refuse a `CleanRun` whose model or transcoders changed since it was made, or whose own tensors were
    edited or replaced (`run.acts[3] *= 2`, `dataclasses.replace(run, tokens=...)`): its clean values would
    no longer be this model's clean pass."""
    made = getattr(run, "made_from", None)
    if not made:
        raise ValueError(
            f"{name} is a CleanRun that clean_run did not make: make it with clean_run(model, transcoders, "
            "prompt)."
        )
    now = clean_run_state(run)
    changed = []
    for what in sorted(set(made) | set(now)):
        before, after = made.get(what, {}), now.get(what, {})
        if before != after:
            names = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            changed.append(what if what != "its own tensors" else f"its {', '.join(names[:4])}")
    if changed:
        raise ValueError(
            f"{name} is a stale CleanRun: {'; '.join(changed)} changed since clean_run made it, so its clean "
            "values no longer belong to this model. Make a new one with clean_run(model, transcoders, "
            "prompt) after the change."
        )


# --------------------------------------------------------------------------------------------------
# Results and the world they were made in
# --------------------------------------------------------------------------------------------------

_SAMPLE = 1 << 22  # larger weights are hashed on a strided sample of this many entries (plus their sum)
_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _transcoder_digest(tc: torch.nn.Module) -> str:
    state = tuple((name, p._version, p.data_ptr()) for name, p in tc.named_parameters())
    cached = _digests.get(tc)
    if cached is not None and cached[0] == state:
        return cached[1]
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(tc.named_parameters()):
            flat = p.detach().reshape(-1)
            total = flat.double().sum().item()
            if flat.numel() > _SAMPLE:
                flat = flat[:: flat.numel() // _SAMPLE + 1]
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{total!r}".encode())
            h.update(flat.to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest = h.hexdigest()[:16]
    _digests[tc] = (state, digest)
    return digest


def world_fingerprint(model: Any, transcoders: Mapping[int, Any]) -> dict[str, Any]:
    """What identifies the world a result was made in: the model's name and shapes, a hash of its weights
    and of each transcoder's (stored with the result, compared by `check_result_fits`)."""
    cfg = model.cfg
    return {
        "model_name": str(getattr(cfg, "model_name", "")),
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "d_vocab": int(cfg.d_vocab),
        "model": weights_digest(model),
        "transcoders": {str(layer): _transcoder_digest(tc) for layer, tc in sorted(transcoders.items())},
    }


def _check_result_type(name: str, result: object) -> None:
    # Duck-typed: the autograder hands exercises a plain namespace with these two fields.
    if not (hasattr(result, "graph") and hasattr(result, "adjacency_matrix")):
        raise TypeError(
            f"{name} must be an AttributionResult (what attribute returns, or AttributionResult.load(path)), "
            f"got {type(result).__name__}."
        )


def check_result_fits(result: Any, model: Any, transcoders: Mapping[int, Any] | None = None) -> None:
    """Refuse a result made on another model or other transcoders than these (predictions and measurements
    would then describe two different worlds)."""
    _check_result_type("result", result)
    g, cfg = result.graph, model.cfg
    problems = []
    if g.n_layers != cfg.n_layers:
        problems.append(f"{g.n_layers} layers, the model {cfg.n_layers}")
    if g.writing_vecs.shape[-1] != cfg.d_model:
        problems.append(f"d_model {g.writing_vecs.shape[-1]}, the model {cfg.d_model}")
    made = getattr(result, "world", None)
    if not isinstance(made, Mapping):
        raise ValueError(
            "This result does not record the model and transcoders it was made with (its world is "
            f"{made!r}), so it cannot be checked against these: run attribute again on them."
        )
    now = world_fingerprint(model, transcoders or {})
    for key in ("model_name", "d_vocab"):
        if key in made and made[key] != now[key]:
            problems.append(f"{key} {made[key]!r}, the model {now[key]!r}")
    if "model" in made and made["model"] != now["model"] and not problems:
        problems.append("the model's weights differ (changed since, or another model of the same name)")
    for layer, digest in now["transcoders"].items():
        if layer in made.get("transcoders", {}) and made["transcoders"][layer] != digest:
            problems.append(f"transcoder {layer}'s weights differ")
    if not problems:
        n_tokens = model.to_tokens(result.prompt, truncate=False).shape[1]
        if n_tokens != g.seq_len:
            problems.append(f"its prompt is {g.seq_len} tokens long, {n_tokens} in this model's tokenizer")
    if problems:
        raise ValueError(
            "This result was made on another world than the model and transcoders given "
            f"({'; '.join(problems)}): use it with the model and transcoders it was made with, or run "
            "attribute again on these."
        )


# --------------------------------------------------------------------------------------------------
# The model: one thread at a time, checked once per outermost call, buffers put back
# --------------------------------------------------------------------------------------------------

# id(model) -> [thread ident, thread name, depth]
_busy: dict[int, list] = {}
_busy_lock = threading.Lock()
# tokenizer -> the lock its guarded calls take turns on: a fast tokenizer used by two threads at once fails
# with Rust's "Already borrowed" (two models may share one tokenizer).
_tokenizer_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_any_tokenizer = threading.RLock()  # for a tokenizer that cannot be a weak key


def _tokenizer_lock(model: Any) -> Any:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return contextlib.nullcontext()
    with _busy_lock:
        try:
            return _tokenizer_locks.setdefault(tokenizer, threading.RLock())
        except TypeError:
            return _any_tokenizer


class _Gate:
    """Where another thread's use of a model waits while a guarded call holds it, so that it never runs with
    the call's hooks (nor has its own hooks removed when the call's `model.hooks()` context ends, which
    removes every hook added at its level): a forward pre-hook on the embedding (a plain `model(tokens)`)
    and `model.hooks` (`run_with_cache`, `run_with_hooks`). The thread that holds the model passes. A
    forward already running when the call began is not covered."""

    guard_gate = True  # `checks.existing_hooks` leaves it out

    def __init__(self) -> None:
        self.owner = threading.get_ident()
        self.open = threading.Event()

    def wait(self) -> None:
        if threading.get_ident() != self.owner:
            self.open.wait()

    def __call__(self, module: Any, args: Any) -> None:
        self.wait()

    @contextmanager
    def install(self, model: Any) -> Iterator[None]:
        embed = getattr(model, "embed", None)
        handle = embed.register_forward_pre_hook(self) if isinstance(embed, torch.nn.Module) else None
        real_hooks = model.hooks
        has_own = "hooks" in vars(model)

        def hooks(*args: Any, **kwargs: Any) -> Any:
            self.wait()
            return real_hooks(*args, **kwargs)

        if not has_own:
            vars(model)["hooks"] = hooks  # an instance attribute, shadowing the method for the call
        try:
            yield
        finally:
            if not has_own:
                vars(model).pop("hooks", None)
            if handle is not None:
                handle.remove()
            self.open.set()


def _check_model_type(model: Any) -> None:
    if not (hasattr(model, "cfg") and hasattr(model, "hook_dict")):
        raise TypeError(
            "model must be a HookedSAETransformer (from load_world or make_toy_world), got "
            f"{type(model).__name__}."
        )


def check_model(model: Any, stacklevel: int) -> None:
    """Refuse what cannot run (a deepcopied or inference-mode model); warn about hooks already on it."""
    foreign = foreign_mlp(model)
    if foreign is not None:
        raise RuntimeError(
            f"{foreign} of this model runs the MLP of another model: it looks like a copy.deepcopy of a "
            "HookedSAETransformer, whose MLP forward SAELens wraps in a closure over the original module, "
            "so the copy computes with the original's MLP weights and hooks. Build the second model the way "
            "you built the first, or copy the weights into a fresh one: twin = "
            "HookedSAETransformer(model.cfg, model.tokenizer); twin.load_state_dict(model.state_dict()); "
            "twin.set_use_hook_mlp_in(True)."
        )
    if any(p.is_inference() for p in model.parameters()):
        raise RuntimeError(
            "The model was loaded inside torch.inference_mode(), so autograd cannot use its weights "
            "(attribution differentiates through them): load it outside inference_mode "
            "(torch.no_grad() is fine)."
        )
    hooks = existing_hooks(model)
    if hooks:
        warnings.warn(
            f"The model already carries {len(hooks)} hook(s), which run during this call and change its "
            f"result: {'; '.join(hooks[:8])}{'; ...' if len(hooks) > 8 else ''}. Remove them first: "
            "model.reset_hooks(including_permanent=True) removes TransformerLens hooks, and a torch hook "
            "goes with .remove() on the handle its register_*_hook call returned.",
            ExistingHooksWarning,
            stacklevel=stacklevel,
        )


@contextmanager
def model_session(model: Any, name: str, stacklevel: int = 4) -> Iterator[bool]:
    """Hold `model` for this thread for the call; yields whether this is the outermost call on it.

    The outermost call checks the model (`check_model`) and, on the way out, puts back any buffer that was
    replaced (TransformerLens re-creates its rotary and mask buffers for inputs longer than they are).
    """
    _check_model_type(model)
    me = threading.get_ident()
    with _busy_lock:
        entry = _busy.get(id(model))
        if entry is None:
            entry = _busy[id(model)] = [me, threading.current_thread().name, 0]
        elif entry[0] != me:
            raise ModelBusyError(
                f"{name} cannot run: another call is already running on this model (in thread {entry[1]!r}); "
                "each run puts its own hooks on the model, so runs on one model must take turns. Wait for "
                "that call to finish, or give each thread its own model, loaded separately."
            )
        entry[2] += 1
    outermost = entry[2] == 1
    buffers = []
    with contextlib.ExitStack() as stack:
        try:
            if outermost:
                stack.enter_context(_tokenizer_lock(model))
                check_model(model, stacklevel)
                # Persistence too: a buffer re-registered as non-persistent would drop out of state_dict.
                buffers = [
                    (m, key, b, key in m._non_persistent_buffers_set)
                    for m in model.modules()
                    for key, b in m._buffers.items()
                ]
                stack.enter_context(_Gate().install(model))
            with torch.inference_mode(False):
                yield outermost
        finally:
            for module, key, b, transient in buffers:
                if module._buffers.get(key) is not b:
                    module._buffers[key] = b
                if transient:
                    module._non_persistent_buffers_set.add(key)
                else:
                    module._non_persistent_buffers_set.discard(key)
            with _busy_lock:
                entry[2] -= 1
                if entry[2] == 0:
                    del _busy[id(model)]


# --------------------------------------------------------------------------------------------------
# The decorator
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What an entry point's arguments are, by parameter name."""

    model: str | None = None  # the model: locked, checked, buffers restored
    transcoders: str | None = None  # a {layer: transcoder} dict (any subset of layers)
    transcoder: str | None = None  # one transcoder
    tokens: str | None = None  # text or token ids of one prompt, within n_ctx
    token_rows: str | None = None  # token ids of several prompts, each within n_ctx (`check_token_rows`)
    result: str | None = None  # an AttributionResult (checked against the model, when there is one)
    counts: Mapping[str, int] = field(default_factory=dict)  # name -> minimum (None allowed if the default)
    flags: tuple[str, ...] = ()  # True / False (None allowed if the default is None)
    layers: tuple[str, ...] = ()  # None or a list of layer numbers
    reals: tuple[str, ...] = ()  # finite numbers within the model's dtype
    check: Callable[[dict[str, Any]], None] | None = None  # the entry point's own extra checks
    # Which of model, transcoders, transcoder, tokens, token_rows and result may be None (then unchecked).
    optional: tuple[str, ...] = ()


def _dtype_of(args: dict[str, Any], spec: Spec) -> torch.dtype:
    for name in (spec.transcoder, spec.model):
        obj = args.get(name) if name else None
        dtype = (
            getattr(obj, "dtype", None)
            if name == spec.transcoder
            else getattr(getattr(obj, "cfg", None), "dtype", None)
        )
        if isinstance(dtype, torch.dtype):
            return dtype
    return torch.float32


def _given(spec: Spec, args: dict[str, Any], name: str | None) -> bool:
    """Whether the argument `name` of the spec is there to check (named, and not an allowed None)."""
    return name is not None and not (args[name] is None and name in spec.optional)


def _check_arguments(spec: Spec, args: dict[str, Any], defaults: dict[str, Any]) -> None:
    model = args.get(spec.model) if _given(spec, args, spec.model) else None
    for name, minimum in spec.counts.items():
        if not (args[name] is None and defaults.get(name) is None):
            args[name] = as_count(name, args[name], minimum)
    for name in spec.flags:
        args[name] = as_flag(name, args[name], optional=defaults.get(name, False) is None)
    for name in spec.layers:
        args[name] = as_layers(name, args[name], model.cfg.n_layers)
    dtype = _dtype_of(args, spec)
    for name in spec.reals:
        args[name] = as_real(name, args[name], dtype)
    if _given(spec, args, spec.transcoders):
        if model is None:  # without the model only their form can be checked
            for key, tc in _as_transcoder_dict(args[spec.transcoders]).items():
                if not (hasattr(getattr(tc, "cfg", None), "metadata") and hasattr(tc, "W_dec")):
                    raise TypeError(
                        f"transcoders[{key!r}] must be a transcoder (SAELens, with .cfg.metadata), got "
                        f"{type(tc).__name__}."
                    )
        else:
            check_some_transcoders(model, args[spec.transcoders])
    if _given(spec, args, spec.transcoder):
        check_transcoder(model, args[spec.transcoder], name=spec.transcoder)
    if _given(spec, args, spec.tokens):
        args[f"_{spec.tokens}_length"] = check_token_input(model, args[spec.tokens], spec.tokens)
    if _given(spec, args, spec.token_rows):
        check_token_rows(model, args[spec.token_rows], spec.token_rows)
    if _given(spec, args, spec.result):
        _check_result_type(spec.result, args[spec.result])
        if model is not None:
            transcoders = args[spec.transcoders] if _given(spec, args, spec.transcoders) else None
            check_result_fits(args[spec.result], model, transcoders)
    if spec.check is not None:
        spec.check(args)


def guarded(**spec_fields: Any) -> Callable[[F], F]:
    """Route every call of the decorated function through the guard (see the module docstring); the keyword
    arguments are a `Spec`. The function is listed in `ENTRY_POINTS`."""
    spec = Spec(**spec_fields)

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not p.empty}
        label = fn.__qualname__

        @functools.wraps(fn)
        def entry(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{label}(): {err}") from None
            bound.apply_defaults()
            values = dict(bound.arguments)
            with_model = _given(spec, values, spec.model)
            model = values[spec.model] if with_model else None
            session = model_session(model, label, stacklevel=5) if with_model else _no_session()
            with session:
                _check_arguments(spec, values, defaults)
                for key in bound.arguments:
                    bound.arguments[key] = values[key]
                return fn(*bound.args, **bound.kwargs)

        entry.__guarded__ = spec  # type: ignore[attr-defined]
        ENTRY_POINTS[f"{fn.__module__}.{fn.__qualname__}"] = entry
        return entry  # type: ignore[return-value]

    return decorate


@contextmanager
def _no_session() -> Iterator[bool]:
    yield True


# --------------------------------------------------------------------------------------------------
# Interventions and node lists
# --------------------------------------------------------------------------------------------------


def check_interventions(
    transcoders: Mapping[int, Any], seq_len: int, interventions: object
) -> list[tuple[int, int, int, float]]:
    """Every `(layer, position, latent, value)` checked strictly, as plain numbers; a latent set twice is
    refused (the last setting would win without a word)."""
    if isinstance(interventions, (str, bytes, Mapping)) or not hasattr(interventions, "__iter__"):
        raise TypeError(
            "interventions must be a list of (layer, position, latent, value) tuples, got "
            f"{type(interventions).__name__}."
        )
    checked: list[tuple[int, int, int, float]] = []
    seen: dict[tuple[int, int, int], int] = {}
    for i, item in enumerate(interventions):
        if isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) != 4:
            raise ValueError(
                f"interventions[{i}] = {item!r}: each intervention is (layer, position, latent, value)."
            )
        layer, pos, latent, value = item
        layer = as_count(f"interventions[{i}] layer", layer)
        if layer not in transcoders:
            raise ValueError(
                f"interventions[{i}]: there is no transcoder at layer {layer}; the transcoders cover "
                f"layers {sorted(transcoders)}."
            )
        pos = as_count(f"interventions[{i}] position", pos, minimum=-(1 << 62))
        if not 0 <= pos < seq_len:
            raise ValueError(
                f"interventions[{i}]: position {pos} is outside the prompt, which has {seq_len} "
                f"tokens (positions 0..{seq_len - 1})."
            )
        d_sae = transcoders[layer].cfg.d_sae
        latent = as_count(f"interventions[{i}] latent", latent, minimum=-(1 << 62))
        if not 0 <= latent < d_sae:
            raise ValueError(
                f"interventions[{i}]: latent {latent} is out of range; layer {layer}'s transcoder "
                f"has {d_sae} latents (0..{d_sae - 1})."
            )
        try:
            value = as_real(f"interventions[{i}] value", value, transcoders[layer].dtype)
        except ValueError as err:
            raise ValueError(f"{err} Set a finite number (0 ablates).") from None
        key = (layer, pos, latent)
        if key in seen:
            raise ValueError(
                f"interventions[{i}] sets layer {layer}, position {pos}, latent {latent} again (first set by "
                f"interventions[{seen[key]}]): set each latent once."
            )
        seen[key] = i
        checked.append((layer, pos, latent, value))
    return checked


def check_latent_nodes(result: Any, node_indices: object, name: str = "node_indices") -> list[int]:
    """Indices of latent nodes of `result`, strictly checked."""
    nodes = result.graph.nodes
    indices = as_indices(name, node_indices, len(nodes), f"the graph has {len(nodes)} nodes")
    for i in indices:
        kind = getattr(nodes[i].node_type, "value", nodes[i].node_type)
        if kind != "latent":
            raise ValueError(f"node {i} is a {kind} node: effects are predicted for latents.")
    return indices
