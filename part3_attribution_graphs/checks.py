"""Input checks for `attribute`: each bad input stops with an error that says what is wrong and what to do.

What they catch, and what would happen otherwise:

- numbers of the wrong kind (`top_k=2.5`, `batch_size=True`): torch errors far from the call, or a silent
  `True == 1`; thresholds given as numpy or torch scalars are accepted;
- a prompt longer than the model's context: TransformerLens would keep its first `n_ctx` tokens, and the
  graph would explain a different token than the one asked about;
- transcoders that are not a `{layer: transcoder}` dict, belong to another model, read or write at the wrong
  hook, or hold NaN or inf weights (which give a NaN graph);
- a model already carrying hooks (they would change the graph): a warning naming them;
- a model copied with `copy.deepcopy` (SAELens wraps each MLP's `forward` in a closure over the original
  module, which the copy still calls), or loaded inside `torch.inference_mode()`;
- two `attribute` calls on one model at once (each installs hooks the other would run through).
"""

from __future__ import annotations

import functools
import operator
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from .pruning import check_threshold

__all__ = [
    "AttributeArgs",
    "ExistingHooksWarning",
    "as_count",
    "check_attribute_inputs",
    "check_finite_adjacency",
    "check_model",
    "check_prompt",
    "check_transcoders",
    "existing_hooks",
    "one_run_per_model",
]

F = TypeVar("F", bound=Callable[..., Any])


class ExistingHooksWarning(UserWarning):
    """The model carried hooks before `attribute` added its own."""


class AttributeArgs(NamedTuple):
    """`attribute`'s numeric arguments, checked and converted to plain Python numbers."""

    n_output_nodes: int
    start_posn: int
    top_k: int
    batch_size: int
    node_threshold: float
    edge_threshold: float


def as_count(name: str, value: object, minimum: int = 0) -> int:
    """`value` as an int of at least `minimum`; anything that is not a whole number (bools included) is
    refused."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a whole number, got the bool {value!r}.")
    try:
        count = operator.index(value)  # int, numpy integer or integer 0-d tensor; never a float
    except TypeError:
        raise TypeError(
            f"{name} must be a whole number (an int), got {value!r} ({type(value).__name__})."
        ) from None
    if count < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {count}.")
    return count


def check_prompt(prompt: object) -> str:
    """The prompt if it is non-empty text; bytes and other types get a `TypeError` that says what to pass."""
    if isinstance(prompt, (bytes, bytearray)):
        raise TypeError("prompt is bytes; attribute needs text: pass prompt.decode('utf-8').")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str (the text to attribute), got {type(prompt).__name__}.")
    if not prompt:
        raise ValueError("prompt is empty: pass the text to attribute (use format_prompt for chat models).")
    return prompt


def _check_prompt_length(model: Any, prompt: str, start_posn: int) -> None:
    """The prompt must fit in the context (else it would be cut) and be longer than the masked prefix."""
    n_tokens = model.to_tokens(prompt, truncate=False).shape[1]
    n_ctx = model.cfg.n_ctx
    if n_tokens > n_ctx:
        raise ValueError(
            f"The prompt has {n_tokens} tokens but the model's context holds n_ctx={n_ctx}: it would be "
            f"cut to its first {n_ctx} tokens and the graph would explain another token. Shorten the "
            f"prompt, or load the model with a larger n_ctx."
        )
    if n_tokens <= start_posn:
        raise ValueError(
            f"The prompt has {n_tokens} tokens, no more than start_posn={start_posn} masked ones, so "
            f"there is nothing to attribute: use a longer prompt or a smaller start_posn."
        )


# Transcoders whose weights were found finite, with the (version, storage) of each weight when checked:
# large transcoders are checked once, and again only after an in-place change.
_finite_when: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_state(module: torch.nn.Module) -> tuple:
    return tuple((name, p._version, p.data_ptr()) for name, p in module.named_parameters())


def _check_finite_weights(layer: int, tc: torch.nn.Module) -> None:
    state = _weights_state(tc)
    if _finite_when.get(tc) == state:
        return
    for name, p in tc.named_parameters():
        if not torch.isfinite(p).all():
            n_bad = int((~torch.isfinite(p)).sum())
            raise ValueError(
                f"transcoders[{layer}].{name} has {n_bad} NaN or inf entries, which would make the "
                f"whole graph NaN. Reload or refit this transcoder."
            )
    _finite_when[tc] = state


def check_transcoders(model: Any, transcoders: object) -> None:
    """Raise a clear error unless there is one finite transcoder per layer that reads and writes that layer's
    MLP."""
    if not isinstance(transcoders, Mapping):
        hint = (
            " (e.g. dict(enumerate(transcoders)) for a list in layer order)"
            if isinstance(transcoders, (list, tuple))
            else ""
        )
        raise TypeError(
            f"transcoders must be a dict {{layer: transcoder}}{hint}, got {type(transcoders).__name__}."
        )
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    layers = list(transcoders)
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in layers) or sorted(layers) != list(
        range(n_layers)
    ):
        raise ValueError(
            f"transcoders must have one entry per layer 0..{n_layers - 1} of this model, got "
            f"layers {layers!r}. Load the transcoders for this model."
        )
    for layer, tc in transcoders.items():
        d_in, d_out = tc.cfg.d_in, getattr(tc.cfg, "d_out", tc.cfg.d_in)
        if d_in != d_model or d_out != d_model:
            raise ValueError(
                f"transcoders[{layer}] maps {d_in} -> {d_out} dims but the model has d_model="
                f"{d_model}: these transcoders belong to another model."
            )
        reads, writes = tc.cfg.metadata.hook_name, getattr(tc.cfg.metadata, "hook_name_out", None)
        if reads != f"blocks.{layer}.mlp.hook_in":
            raise ValueError(
                f"transcoders[{layer}] reads {reads!r}; attribution needs "
                f"'blocks.{layer}.mlp.hook_in' (the ln2 output). Set tc.cfg.metadata.hook_name."
            )
        if writes != f"blocks.{layer}.hook_mlp_out":
            raise ValueError(
                f"transcoders[{layer}] writes {writes!r}; attribution needs "
                f"'blocks.{layer}.hook_mlp_out' (its own layer's MLP output). "
                f"Set tc.cfg.metadata.hook_name_out."
            )
        if any(p.is_inference() for p in tc.parameters()):
            raise RuntimeError(
                f"transcoders[{layer}] was loaded inside torch.inference_mode(), so autograd cannot "
                f"use its weights: load it outside inference_mode (torch.no_grad() is fine)."
            )
        _check_finite_weights(layer, tc)


_TORCH_HOOK_KINDS = {
    "_forward_pre_hooks": "forward pre-hook",
    "_forward_hooks": "forward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_backward_hooks": "backward hook",
}


def _fn_name(fn: object) -> str:
    # TransformerLens names its wrapper after repr(your function): "<function my_hook at 0x...>".
    name = getattr(fn, "__name__", None) or repr(fn)
    match = re.fullmatch(
        r"<(?:function|bound method) ([^ ]+)(?: of .*)? at 0x[0-9a-f]+>|<bound method ([^ ]+) of .*>",
        name,
        re.S,
    )
    return next((g for g in match.groups() if g), name) if match else name


def existing_hooks(model: torch.nn.Module) -> list[str]:
    """Every hook on the model's modules (TransformerLens or raw torch) and torch's global module hooks,
    described."""
    found = []
    for name, module in model.named_modules():
        lens = {}
        if isinstance(module, HookPoint):
            for handles, direction in ((module.fwd_hooks, "forward"), (module.bwd_hooks, "backward")):
                for h in handles:
                    lens[h.hook.id] = (
                        f"TransformerLens {'permanent ' if h.is_permanent else ''}{direction} hook"
                    )
        for attr, kind in _TORCH_HOOK_KINDS.items():
            for hook_id, fn in getattr(module, attr, {}).items():
                found.append(f"{name or '<model>'}: {lens.get(hook_id, 'torch ' + kind)} {_fn_name(fn)}")
    import torch.nn.modules.module as torch_module

    for attr in (
        "_global_forward_pre_hooks",
        "_global_forward_hooks",
        "_global_backward_pre_hooks",
        "_global_backward_hooks",
    ):
        for fn in getattr(torch_module, attr, {}).values():
            found.append(
                f"every module: torch global {attr.removeprefix('_global_').replace('_', ' ')[:-1]} "
                f"{_fn_name(fn)}"
            )
    return found


def _foreign_mlp(model: torch.nn.Module) -> str | None:
    """The first block whose MLP forward is a closure over another module (what copy.deepcopy leaves
    behind)."""
    for i, block in enumerate(getattr(model, "blocks", [])):
        mlp = getattr(block, "mlp", None)
        forward = vars(mlp).get("forward") if mlp is not None else None
        for cell in getattr(forward, "__closure__", None) or ():
            try:
                held = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            owner = getattr(held, "__self__", held)  # a bound method's module, or the module itself
            if isinstance(owner, torch.nn.Module) and owner is not mlp:
                return f"blocks.{i}.mlp"
    return None


def check_model(model: torch.nn.Module) -> None:
    """Refuse models autograd cannot run or that compute with another model's MLPs; warn about existing
    hooks."""
    foreign = _foreign_mlp(model)
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
            f"The model already carries {len(hooks)} hook(s), which run during attribution and change the "
            f"graph: {'; '.join(hooks[:8])}{'; ...' if len(hooks) > 8 else ''}. Remove them first: "
            "model.reset_hooks(including_permanent=True) removes TransformerLens hooks, and a torch hook "
            "goes with .remove() on the handle its register_*_hook call returned.",
            ExistingHooksWarning,
            stacklevel=5,  # the caller of `attribute`
        )


def check_attribute_inputs(
    model: Any,
    transcoders: object,
    prompt: object,
    n_output_nodes: object,
    start_posn: object,
    top_k: object,
    batch_size: object,
    node_threshold: object,
    edge_threshold: object,
) -> AttributeArgs:
    """Check everything `attribute` is given, before any hook goes on; return the numbers as plain Python
    ones."""
    args = AttributeArgs(
        n_output_nodes=as_count("n_output_nodes", n_output_nodes, minimum=1),
        start_posn=as_count("start_posn", start_posn),
        top_k=as_count("top_k", top_k),
        batch_size=as_count("batch_size", batch_size, minimum=1),
        node_threshold=check_threshold("node_threshold", node_threshold),
        edge_threshold=check_threshold("edge_threshold", edge_threshold),
    )
    if args.n_output_nodes > model.cfg.d_vocab:
        raise ValueError(
            f"n_output_nodes must be in [1, {model.cfg.d_vocab}] (the vocabulary size), got "
            f"{args.n_output_nodes}."
        )
    check_prompt(prompt)
    check_transcoders(model, transcoders)
    check_model(model)
    _check_prompt_length(model, prompt, args.start_posn)
    return args


def check_finite_adjacency(adjacency: Float[Tensor, "n_nodes n_nodes"]) -> None:
    """Raise if the adjacency matrix holds NaN or inf (pruning and the dashboard would fail or mislead)."""
    bad = ~torch.isfinite(adjacency)
    if bad.any():
        target, source = (int(i) for i in bad.nonzero()[0])
        raise FloatingPointError(
            f"The adjacency matrix has {int(bad.sum())} NaN or inf entries (the first is the edge from node "
            f"{source} to node {target}). Check the model's and transcoders' weights for NaN or inf, and use "
            "float32 if they are float16 (which overflows)."
        )


# Models with an attribution running now (by id), and the thread running it.
_running: dict[int, str] = {}
_running_lock = threading.Lock()


def one_run_per_model(fn: F) -> F:
    """Decorate `fn(model, ...)` so that a second call on the same model while one runs is refused clearly.

    Each run installs hooks on the model and reads what its own hooks stored, so two runs at once would
    read each other's activations. The run also works inside `torch.inference_mode()`, which would
    otherwise make every tensor unusable by autograd.
    """

    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        with _running_lock:
            other = _running.get(id(model))
            if other is None:
                _running[id(model)] = threading.current_thread().name
        if other is not None:
            raise RuntimeError(
                f"{fn.__name__} is already running on this model (in thread {other!r}); each run puts its "
                "own hooks on the model, so runs on one model must take turns. Wait for that call to "
                "finish, or give each thread its own model, loaded separately."
            )
        try:
            with torch.inference_mode(False):
                return fn(model, *args, **kwargs)
        finally:
            with _running_lock:
                del _running[id(model)]

    return run  # type: ignore[return-value]
