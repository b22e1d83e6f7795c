"""Input checks: each bad input stops with an error that says what is wrong and what to do.

`guard.py` applies them to every entry point (and adds the per-model lock); `check_attribute_inputs` holds
what only `attribute` takes.

What they catch, and what would happen otherwise:

- numbers of the wrong kind (`top_k=2.5`, `batch_size=True`): torch errors far from the call, or a silent
  `True == 1`; thresholds given as numpy or torch scalars are accepted;
- a prompt longer than the model's context: TransformerLens would keep its first `n_ctx` tokens, and the
  graph would explain a different token than the one asked about;
- transcoders that are not a `{layer: transcoder}` dict, belong to another model, read or write at the wrong
  hook, or hold NaN or inf weights (which give a NaN graph);
- a model already carrying hooks (they would change the graph): `existing_hooks` names them;
- a model copied with `copy.deepcopy` (SAELens wraps each MLP's `forward` in a closure over the original
  module, which the copy still calls): `foreign_mlp` finds it.
"""

from __future__ import annotations

import operator
import re
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

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
    "check_finite_weights",
    "check_prompt",
    "check_some_transcoders",
    "check_transcoder",
    "check_transcoders",
    "existing_hooks",
    "foreign_mlp",
]


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


def check_context(model: Any, n_tokens: int, what: str, hint: str = "Shorten the prompt") -> None:
    """Refuse `n_tokens` beyond the model's context (TransformerLens would cut text, or grow its buffers)."""
    n_ctx = model.cfg.n_ctx
    if n_tokens > n_ctx:
        raise ValueError(
            f"{what} has {n_tokens} tokens but the model's context holds n_ctx={n_ctx}. {hint}, or load the "
            "model with a larger n_ctx."
        )


def _check_prompt_length(model: Any, prompt: str, start_posn: int) -> None:
    """The prompt must fit in the context (else it would be cut) and be longer than the masked prefix."""
    n_tokens = model.to_tokens(prompt, truncate=False).shape[1]
    check_context(
        model,
        n_tokens,
        "The prompt",
        hint=f"It would be cut to its first {model.cfg.n_ctx} tokens and the graph would explain another "
        "token. Shorten the prompt",
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


def check_finite_weights(name: str, tc: torch.nn.Module) -> None:
    """Raise, naming the weight, if a transcoder `name` holds a NaN or inf weight (the graph would be NaN)."""
    state = _weights_state(tc)
    if _finite_when.get(tc) == state:
        return
    for weight, p in tc.named_parameters():
        if not torch.isfinite(p).all():
            n_bad = int((~torch.isfinite(p)).sum())
            raise ValueError(
                f"{name}.{weight} has {n_bad} NaN or inf entries, which would make every result that uses it "
                f"NaN. Reload or refit this transcoder."
            )
    _finite_when[tc] = state


def _layer_of(hook_name: object) -> int | None:
    parts = str(hook_name).split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def check_transcoder(model: Any, tc: Any, layer: int | None = None, name: str = "transcoder") -> int:
    """Raise a clear error unless `tc` reads and writes the MLP of one layer of this model (`layer`, when
    given), matches `d_model`, was not loaded in inference mode and has finite weights. Returns its layer."""
    cfg = getattr(tc, "cfg", None)
    metadata = getattr(cfg, "metadata", None)
    if metadata is None or not hasattr(tc, "W_dec"):
        raise TypeError(
            f"{name} must be a transcoder (SAELens, with .cfg.metadata), got {type(tc).__name__}."
        )
    d_in, d_out = cfg.d_in, getattr(cfg, "d_out", cfg.d_in)
    if d_in != model.cfg.d_model or d_out != model.cfg.d_model:
        raise ValueError(
            f"{name} maps {d_in} -> {d_out} dims but the model has d_model={model.cfg.d_model}: "
            "these transcoders belong to another model."
        )
    reads, writes = metadata.hook_name, getattr(metadata, "hook_name_out", None)
    at = _layer_of(reads) if layer is None else layer
    if at is None or reads != f"blocks.{at}.mlp.hook_in" or reads not in model.hook_dict:
        where = f"'blocks.{at}.mlp.hook_in'" if at is not None else "'blocks.{layer}.mlp.hook_in'"
        raise ValueError(
            f"{name} reads {reads!r}; attribution needs {where} (the ln2 output) of this model. "
            "Set tc.cfg.metadata.hook_name."
        )
    if writes != f"blocks.{at}.hook_mlp_out":
        raise ValueError(
            f"{name} writes {writes!r}; attribution needs 'blocks.{at}.hook_mlp_out' (its own layer's MLP "
            "output). Set tc.cfg.metadata.hook_name_out."
        )
    if any(p.is_inference() for p in tc.parameters()):
        raise RuntimeError(
            f"{name} was loaded inside torch.inference_mode(), so autograd cannot use its weights: load it "
            "outside inference_mode (torch.no_grad() is fine)."
        )
    check_finite_weights(name, tc)
    return at


def _as_transcoder_dict(transcoders: object) -> Mapping:
    if not isinstance(transcoders, Mapping):
        hint = (
            " (e.g. dict(enumerate(transcoders)) for a list in layer order)"
            if isinstance(transcoders, (list, tuple))
            else ""
        )
        raise TypeError(
            f"transcoders must be a dict {{layer: transcoder}}{hint}, got {type(transcoders).__name__}."
        )
    return transcoders


def check_some_transcoders(model: Any, transcoders: object) -> None:
    """A `{layer: transcoder}` dict over any layers of the model, each as `check_transcoder`."""
    n_layers = model.cfg.n_layers
    for key, tc in _as_transcoder_dict(transcoders).items():
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < n_layers:
            raise ValueError(
                f"transcoders has the key {key!r}; keys are layer numbers 0..{n_layers - 1} of this model."
            )
        check_transcoder(model, tc, key, f"transcoders[{key}]")


def check_transcoders(model: Any, transcoders: object) -> None:
    """Raise a clear error unless there is one finite transcoder per layer that reads and writes that layer's
    MLP."""
    n_layers = model.cfg.n_layers
    layers = list(_as_transcoder_dict(transcoders))
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in layers) or sorted(layers) != list(
        range(n_layers)
    ):
        raise ValueError(
            f"transcoders must have one entry per layer 0..{n_layers - 1} of this model, got "
            f"layers {layers!r}. Load the transcoders for this model."
        )
    check_some_transcoders(model, transcoders)


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
                if getattr(fn, "guard_gate", False):  # the guard's own, for the length of a guarded call
                    continue
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


def foreign_mlp(model: torch.nn.Module) -> str | None:
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
