"""Interventions: test what a graph claims by editing latents in the model and watching what moves.

A graph predicts, for every latent and logit, how far it moves when a source latent changes. Here we
make the change for real and measure it:

- `intervene` runs the model with the transcoders spliced in: at every layer with a transcoder the MLP
  output is the transcoder's output plus its error, the error held at its clean value, so a change of
  a latent reaches the residual stream through exactly its decoder row. Each intervention
  `(layer, position, latent, value)` sets one latent's activation (0 ablates, `k * a` steers).
- `intervene_generate` does the same while generating greedily, so you can read what a steered
  latent makes the model say.
- `clean_run` does a prompt's clean forward pass once; pass what it returns to `intervene` in place of the
  prompt, and a sweep over many latents of one prompt (`ablation_effects`, swaps) costs one forward pass
  per intervention instead of two.
- `predicted_effects` is what the graph says should happen: the direct effect (the adjacency column,
  every other latent held) and the total effect (downstream latents respond along every path).

With attention patterns and norm scales frozen, the replacement model is linear except for the JumpReLU
gates, so the predictions are exact until a latent crosses its threshold (`tests/test_interventions.py`).

The options, each with what it does when on (frozen) and when off (live):

- `freeze_attention`: frozen, attention patterns (and, by default, every norm scale) at their clean
  values; live, recomputed.
- `freeze_norms` (None: follow `freeze_attention`): frozen, every RMSNorm scale at its clean value;
  live, recomputed.
- `constrained_layers`: frozen, in these layers every latent not intervened on keeps its clean value;
  live, latents respond.
- `hold_errors`: frozen, MLP output = clean output + change of the transcoder's output; live, the real
  MLP runs, plus the edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from .attribution import AttributionResult
from .guard import (
    as_index,
    check_context,
    check_interventions,
    check_latent_nodes,
    clean_run_state,
    guarded,
)
from .nodes import NodeType
from .progress import tqdm
from .replacement import FreezeHooks, Transcoder, hook_names_out, skip_output

__all__ = [
    "Intervention",
    "InterventionResult",
    "CleanRun",
    "clean_run",
    "PredictedEffects",
    "run_with_latent_set",
    "intervene",
    "intervene_generate",
    "predicted_effects",
    "demeaned_logit",
    "ablation_effects",
    "most_influential_latents",
    "agreement",
]

Intervention = tuple[int, int, int, float]  # (layer, position, latent, value)


@dataclass
class InterventionResult:
    """What `intervene` measured.

    `activations[layer][pos, f]` is what latent f computes from its live input at that position (its
    pre-activation when `apply_activation_function=False`), as circuit-tracer reports it: a latent you set,
    or one held by `constrained_layers`, shows what it *would* be, while the forward pass used the set
    (held) value.
    """

    logits: Float[Tensor, "1 seq d_vocab"]
    activations: dict[int, Float[Tensor, "seq d_sae"]]


@dataclass(frozen=True, eq=False)
class CleanRun:
    """A prompt's clean forward pass, kept so that many interventions on it share it (see `clean_run`).

    `frozen_values` holds every attention pattern and RMSNorm scale (what `freeze_attention` and
    `freeze_norms` hold); `mlp_in`, `mlp_out` and `acts` each transcoder's input, the MLP's output and
    the latents' activations, by layer, at every position. `transcoders` are the ones it was made with:
    `intervene` refuses a run made with other transcoders (or another model), and a stale one: made before
    the model's or transcoders' weights changed, or with its own tensors edited or replaced since.
    """

    model: HookedSAETransformer = field(repr=False)
    transcoders: Mapping[int, Transcoder] = field(repr=False)
    tokens: Int[Tensor, "1 seq"]
    frozen_values: dict[str, Tensor] = field(repr=False)
    mlp_in: dict[int, Float[Tensor, "seq d_in"]] = field(repr=False)
    mlp_out: dict[int, Float[Tensor, "seq d_out"]] = field(repr=False)
    acts: dict[int, Float[Tensor, "seq d_sae"]] = field(repr=False)
    # Versions of the model's, the transcoders' and its own tensors when it was made
    # (`guard.clean_run_state`); the guard refuses the run when they differ (weights changed in place, its
    # tensors edited or replaced).
    made_from: dict[str, dict[str, tuple]] = field(default_factory=dict, repr=False, compare=False)


class PredictedEffects(NamedTuple):
    """Per unit epsilon, when each source's activation is scaled by (1 + epsilon): `[source, node]`.

    Targets are latents (their pre-activation) and logits (the demeaned logit); other nodes read nothing.
    """

    direct: Float[Tensor, "n_sources n_nodes"]
    total: Float[Tensor, "n_sources n_nodes"]


# --------------------------------------------------------------------------------------------------
# Exercise: one latent set at one position
# --------------------------------------------------------------------------------------------------


def run_with_latent_set(
    model: HookedSAETransformer,
    transcoder: Transcoder,
    tokens: Int[Tensor, "1 seq"],
    position: int,
    latent: int,
    value: float,
) -> Float[Tensor, "1 seq d_vocab"]:
    """The logits when one latent of `transcoder` is set to `value` at `position` (the model otherwise as
    usual).

    At the transcoder's layer the MLP output becomes its clean value plus what the new activation changes in
    the transcoder's output, `(value - a) * W_dec[latent]` at `position` only, so the MLP error (what the
    transcoder misses) keeps its clean value. Later layers run normally. No hook stays on the model.
    """
    read, write = transcoder.cfg.metadata.hook_name, transcoder.cfg.metadata.hook_name_out
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=read)
        clean = transcoder.encode(cache[read])[0, position, latent]
        change = (value - clean) * transcoder.W_dec[latent]

    def set_latent(mlp_out: Float[Tensor, "batch seq d_model"], hook: HookPoint) -> Tensor:
        mlp_out = mlp_out.clone()
        mlp_out[:, position] += change.to(mlp_out.dtype)
        return mlp_out

    with torch.no_grad(), model.hooks(fwd_hooks=[(write, set_latent)]):
        return model(tokens)


def _latent_set_args(a: dict) -> None:
    if isinstance(a["tokens"], CleanRun):
        raise TypeError(
            "run_with_latent_set takes the prompt's token ids (or text), not a CleanRun: pass run.tokens, or "
            "use intervene(model, transcoders, run, [(layer, position, latent, value)]), which reuses it."
        )
    seq_len, d_sae = a["_tokens_length"], a["transcoder"].cfg.d_sae
    a["position"] = as_index("position", a["position"], seq_len, f"the prompt has {seq_len} tokens")
    a["latent"] = as_index("latent", a["latent"], d_sae, f"the transcoder has {d_sae} latents")


# Guarded here rather than with a decorator: the notebook shows this exercise's source as written above.
run_with_latent_set = guarded(
    model="model", transcoder="transcoder", tokens="tokens", reals=("value",), check=_latent_set_args
)(run_with_latent_set)


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


def _as_tokens(
    model: HookedSAETransformer, prompt_or_tokens: str | Tensor | Sequence[int]
) -> Int[Tensor, "1 seq"]:
    if isinstance(prompt_or_tokens, str):
        if not prompt_or_tokens:
            raise ValueError("The prompt is empty: pass text (format_prompt for chat models) or token ids.")
        return model.to_tokens(prompt_or_tokens)
    tokens = torch.as_tensor(prompt_or_tokens, device=model.cfg.device)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0 or tokens.is_floating_point():
        raise ValueError(
            f"Pass one prompt: a string or token ids of shape (seq,) or (1, seq), got shape "
            f"{tuple(tokens.shape)} ({tokens.dtype})."
        )
    return tokens.long()


def _by_layer(interventions: Iterable[Intervention]) -> dict[int, list[tuple[int, int, float]]]:
    """The (already checked, by the guard) interventions grouped by layer."""
    by_layer: dict[int, list[tuple[int, int, float]]] = {}
    for layer, pos, latent, value in interventions:
        by_layer.setdefault(layer, []).append((pos, latent, value))
    return by_layer


def _pre_activation(tc: Transcoder, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
    """What each latent reads before its activation function: `x @ W_enc + b_enc` (SAELens' encode,
    ungated)."""
    return tc.process_sae_in(x) @ tc.W_enc + tc.b_enc


def _set(acts: Float[Tensor, "seq d_sae"], edits: list[tuple[int, int, float]]) -> Tensor:
    acts = acts.clone()
    for pos, latent, value in edits:
        acts[pos, latent] = value
    return acts


class _Splice:
    """The hooks of one intervention run, one pair per layer with a transcoder."""

    def __init__(
        self, transcoders, clean: CleanRun, edits, constrained, hold_errors, apply_activation_function
    ):
        self.transcoders, self.edits, self.constrained = transcoders, edits, constrained
        self.hold_errors, self.apply_fn = hold_errors, apply_activation_function
        self.clean_in, self.clean_out, self.clean_acts = clean.mlp_in, clean.mlp_out, clean.acts
        self.live_in: dict[int, Tensor] = {}
        self.activations: dict[int, Tensor] = {}

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        hooks = []
        for layer, tc in self.transcoders.items():
            hooks.append((tc.cfg.metadata.hook_name, self._read(layer, tc)))
            hooks.append((hook_names_out(tc), self._write(layer, tc)))
        return hooks

    def _read(self, layer: int, tc: Transcoder) -> Callable:
        def read(x: Tensor, hook: HookPoint) -> None:
            x = x[0].to(tc.dtype)
            self.live_in[layer] = x
            self.activations[layer] = tc.encode(x) if self.apply_fn else _pre_activation(tc, x)

        return read

    def _write(self, layer: int, tc: Transcoder) -> Callable:
        def write(mlp_out: Tensor, hook: HookPoint) -> Tensor:
            edits, x = self.edits.get(layer, []), self.live_in[layer]
            if layer in self.constrained or self.hold_errors:
                # Error held: out - tc(x) stays at its clean value, so out = clean out + change of tc's
                # output.
                base = self.clean_acts[layer] if layer in self.constrained else tc.encode(x)
                d_acts = _set(base, edits) - self.clean_acts[layer]
                d_out = d_acts @ tc.W_dec + skip_output(tc, x - self.clean_in[layer])
                return (self.clean_out[layer] + d_out.to(mlp_out.dtype)).unsqueeze(0)
            if not edits:
                return mlp_out
            live = tc.encode(x)
            return mlp_out + ((_set(live, edits) - live) @ tc.W_dec).to(mlp_out.dtype)

        return write


def _intervene_args(a: dict) -> None:
    a["interventions"] = check_interventions(
        a["transcoders"], a["_prompt_or_tokens_length"], a["interventions"]
    )


_FLAGS = ("freeze_attention", "apply_activation_function", "freeze_norms", "hold_errors")


@guarded(model="model", transcoders="transcoders", tokens="prompt_or_tokens")
@torch.no_grad()
def clean_run(
    model: HookedSAETransformer,
    transcoders: Mapping[int, Transcoder],
    prompt_or_tokens: str | Tensor | Sequence[int],
) -> CleanRun:
    """One clean forward pass of a prompt, for `intervene` to reuse: pass it in place of the prompt.

        clean = clean_run(model, transcoders, prompt)
        for edit in edits:  # one forward pass each, not two
            out = intervene(model, transcoders, clean, [edit])

    The result is the same as passing the prompt itself (the clean pass is deterministic).
    """
    tokens = _as_tokens(model, prompt_or_tokens)
    freeze = FreezeHooks(model)
    cache = freeze.cache_frozen_values(tokens)
    mlp_in = {layer: cache[tc.cfg.metadata.hook_name][0] for layer, tc in transcoders.items()}
    run = CleanRun(
        model=model,
        transcoders=dict(transcoders),
        tokens=tokens,
        frozen_values=freeze.frozen_values,
        mlp_in=mlp_in,
        mlp_out={layer: cache[hook_names_out(tc)][0] for layer, tc in transcoders.items()},
        acts={layer: tc.encode(mlp_in[layer].to(tc.dtype)) for layer, tc in transcoders.items()},
    )
    object.__setattr__(run, "made_from", clean_run_state(run))  # frozen dataclass: set once, here
    return run


def _reuse(transcoders: Mapping[int, Transcoder], clean: CleanRun) -> CleanRun:
    """`clean` itself, after checking that it was made with (at least) these transcoders (the guard has
    checked that it was made with this model)."""
    foreign = [layer for layer, tc in transcoders.items() if clean.transcoders.get(layer) is not tc]
    if foreign:
        raise ValueError(
            f"This CleanRun was made without the transcoders you pass for layers {foreign}: make it with "
            "clean_run(model, transcoders, prompt) using the same transcoders."
        )
    return clean


@guarded(
    model="model",
    transcoders="transcoders",
    tokens="prompt_or_tokens",
    flags=_FLAGS,
    layers=("constrained_layers",),
    check=_intervene_args,
)
@torch.no_grad()
def intervene(
    model: HookedSAETransformer,
    transcoders: Mapping[int, Transcoder],
    prompt_or_tokens: str | Tensor | Sequence[int] | CleanRun,
    interventions: Iterable[Intervention],
    *,
    freeze_attention: bool = True,
    constrained_layers: Iterable[int] | None = None,
    apply_activation_function: bool = True,
    freeze_norms: bool | None = None,
    hold_errors: bool = True,
) -> InterventionResult:
    """Run the model with the transcoders spliced in and these latents set; return logits and activations.

    Args:
        prompt_or_tokens: the prompt (text or token ids), or a `CleanRun` of it (`clean_run`), whose clean
            pass is then reused instead of repeated.
        interventions: `(layer, position, latent, value)` each; value 0 ablates, `k * activation` steers.
        freeze_attention: keep every attention pattern at its clean value.
        constrained_layers: layers whose other latents keep their clean values (no effect passes through
            them but the skip); all layers give the graph's direct effects.
        apply_activation_function: report activations (True) or pre-activations (False).
        freeze_norms: keep every RMSNorm scale at its clean value; None follows `freeze_attention`, so the
            default run is the graph's local replacement model. (circuit-tracer freezes only the patterns.)
        hold_errors: each MLP output is the transcoder's output plus its clean error (True), or the real MLP
            plus the edits (False, circuit-tracer's live mode).
    """
    given = isinstance(prompt_or_tokens, CleanRun)
    tokens = prompt_or_tokens.tokens if given else _as_tokens(model, prompt_or_tokens)
    edits = _by_layer(interventions)  # checked by the guard (`_intervene_args`)
    constrained = set() if constrained_layers is None else {int(layer) for layer in constrained_layers}
    if constrained - set(transcoders):
        raise ValueError(
            f"constrained_layers {sorted(constrained - set(transcoders))} have no transcoder; the "
            f"transcoders cover layers {sorted(transcoders)}."
        )
    freeze_norms = freeze_attention if freeze_norms is None else freeze_norms

    clean = _reuse(transcoders, prompt_or_tokens) if given else clean_run(model, transcoders, tokens)
    freeze = FreezeHooks(model)
    kept = ("hook_pattern",) * freeze_attention + ("hook_scale",) * freeze_norms
    freeze.frozen_values = (
        {name: v for name, v in clean.frozen_values.items() if name.endswith(kept)} if kept else {}
    )
    splice = _Splice(transcoders, clean, edits, constrained, hold_errors, apply_activation_function)
    hooks = (freeze.fwd_hooks if freeze.frozen_values else []) + splice.fwd_hooks()
    with model.hooks(fwd_hooks=hooks):  # removes every hook on exit, errors included
        logits = model(tokens)
    return InterventionResult(logits=logits, activations=splice.activations)


def _generate_args(a: dict) -> None:
    _intervene_args(a)
    n_prompt = a["_prompt_or_tokens_length"]
    check_context(
        a["model"],
        n_prompt + a["max_new_tokens"],
        f"The prompt ({n_prompt} tokens) plus max_new_tokens={a['max_new_tokens']}",
        hint="Ask for fewer new tokens or shorten the prompt",
    )


@guarded(
    model="model",
    transcoders="transcoders",
    tokens="prompt_or_tokens",
    counts={"max_new_tokens": 0},
    check=_generate_args,
)
@torch.no_grad()
def intervene_generate(
    model: HookedSAETransformer,
    transcoders: Mapping[int, Transcoder],
    prompt_or_tokens: str | Tensor | Sequence[int],
    interventions: Iterable[Intervention],
    *,
    max_new_tokens: int = 10,
    **kwargs,
) -> str:
    """Greedy continuation (only the new text) with the interventions held at their prompt positions.

    Each new token is the argmax of `intervene` (same keyword options) on the text so far, so frozen
    values always come from a clean pass on the same tokens. No KV cache: fine for tens of tokens.
    """
    if isinstance(prompt_or_tokens, CleanRun):  # each step runs on longer text: nothing to reuse
        prompt_or_tokens = prompt_or_tokens.tokens
    tokens = _as_tokens(model, prompt_or_tokens)
    interventions = list(interventions)  # checked by the guard: positions inside the prompt
    n_prompt = tokens.shape[1]
    for _ in range(max_new_tokens):
        logits = intervene(model, transcoders, tokens, interventions, **kwargs).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return model.tokenizer.decode(tokens[0, n_prompt:].tolist())


# --------------------------------------------------------------------------------------------------
# Exercise: what the graph predicts
# --------------------------------------------------------------------------------------------------


def predicted_effects(result: AttributionResult, node_indices: Sequence[int]) -> PredictedEffects:
    """Direct and total effect of scaling each given latent by (1 + epsilon), per unit epsilon, on every node.

    Direct: the adjacency column `A[:, s]` (every other latent held). Total: downstream latents respond too;
    an active JumpReLU latent passes a change of its pre-activation through with slope 1, and a change
    `d` of latent u's activation moves target t by `A[t, u] * d / a_u`. With `M = A / a` on latent columns
    (zero elsewhere), the changes `x` solve `x = A[:, s] + M x`, i.e. `x = (I - M)^-1 A[:, s]`.

    Returns:
        `PredictedEffects(direct, total)`, each of shape (len(node_indices), n_nodes).
    """
    A = result.adjacency_matrix
    nodes = result.graph.nodes
    idx = torch.as_tensor(list(node_indices), dtype=torch.long, device=A.device)
    for i in idx.tolist():
        if nodes[i].node_type != NodeType.LATENT:
            raise ValueError(
                f"node {i} is a {nodes[i].node_type.value} node: effects are predicted for latents."
            )
    acts = torch.tensor(
        [n.activation if n.node_type == NodeType.LATENT else 0.0 for n in nodes],
        dtype=A.dtype,
        device=A.device,
    )
    gain = torch.where(acts != 0, 1 / acts, torch.zeros_like(acts))
    M = A * gain  # column u scaled by 1 / a_u: the edge per unit change of u's activation
    # Edges run from earlier to later nodes, so I - M is unit lower triangular: a triangular solve.
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    total = torch.linalg.solve_triangular(eye - M, A[:, idx], upper=False, unitriangular=True)
    return PredictedEffects(direct=A[:, idx].T, total=total.T)


def _latent_nodes_args(a: dict) -> None:
    a["node_indices"] = check_latent_nodes(a["result"], a["node_indices"])


# Guarded here rather than with a decorator: the notebook shows this exercise's source as written above.
predicted_effects = guarded(result="result", check=_latent_nodes_args)(predicted_effects)


# --------------------------------------------------------------------------------------------------
# Measuring the graph against the model
# --------------------------------------------------------------------------------------------------


def _logit_args(a: dict) -> None:
    logits = a["logits"]
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        raise TypeError("logits must be a tensor of shape (..., seq, d_vocab), as the model returns them.")
    a["token_id"] = as_index("token_id", a["token_id"], logits.shape[-1], "a token id of this vocabulary")


@guarded(check=_logit_args)
def demeaned_logit(logits: Float[Tensor, "... d_vocab"], token_id: int) -> Float[Tensor, "..."]:
    """A token's logit minus the mean logit: what a logit node reads (at the last position)."""
    last = logits[..., -1, :]
    return last[..., token_id] - last.mean(-1)


def _ablation_args(a: dict) -> None:
    _latent_nodes_args(a)
    if a["logit_index"] is not None:
        nodes = a["result"].graph.nodes
        a["logit_index"] = as_index("logit_index", a["logit_index"], len(nodes), "a node index of the graph")
        if nodes[a["logit_index"]].node_type != NodeType.LOGIT:
            raise ValueError(
                f"logit_index {a['logit_index']} is a {nodes[a['logit_index']].node_type.value} node: pass "
                "the index of a logit node (result.graph.node_range_dict['L'] gives their range)."
            )


@guarded(model="model", transcoders="transcoders", result="result", reals=("scale",), check=_ablation_args)
def ablation_effects(
    model: HookedSAETransformer,
    transcoders: Mapping[int, Transcoder],
    result: AttributionResult,
    node_indices: Sequence[int],
    *,
    scale: float = 0.0,
    logit_index: int | None = None,
    **kwargs,
) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """Predicted (total effect) and measured change of one logit node when each latent is scaled by `scale`.

    `scale=0` ablates. `logit_index` is a node index (default: the most probable logit node). Keyword
    arguments go to `intervene` (e.g. `freeze_attention=False` for the live model).
    """
    nodes = result.graph.nodes
    if logit_index is None:
        logit_index = result.graph.node_range_dict["L"][0]
    token = nodes[logit_index].feature
    run = clean_run(model, transcoders, result.prompt)  # one clean pass for the whole sweep
    clean = demeaned_logit(intervene(model, transcoders, run, [], **kwargs).logits, token)
    predicted = (scale - 1) * predicted_effects(result, node_indices).total[:, logit_index]
    measured = []
    for i in tqdm(node_indices, desc="ablations", leave=False, disable=len(node_indices) < 2):
        n = nodes[i]
        out = intervene(
            model, transcoders, run, [(n.layer, n.ctx_idx, n.feature, scale * n.activation)], **kwargs
        )
        measured.append(float(demeaned_logit(out.logits, token) - clean))
    return predicted.cpu(), torch.tensor(measured, dtype=predicted.dtype)


@guarded(result="result", counts={"n": 0})
def most_influential_latents(result: AttributionResult, n: int) -> list[int]:
    """Node indices of the `n` latents with the largest influence on the logits, most influential first."""
    latents = [i for i, node in enumerate(result.graph.nodes) if node.node_type == NodeType.LATENT]
    return sorted(latents, key=lambda i: -float(result.influence[i]))[:n]


def _agreement_args(a: dict) -> None:
    p, m = a["predicted"], a["measured"]
    if not (isinstance(p, Tensor) and isinstance(m, Tensor) and p.dim() == m.dim() == 1 and len(p) == len(m)):
        raise ValueError(
            "predicted and measured must be 1-d tensors of one length (what ablation_effects returns), got "
            f"{getattr(p, 'shape', type(p).__name__)} and {getattr(m, 'shape', type(m).__name__)}."
        )


@guarded(check=_agreement_args)
def agreement(predicted: Float[Tensor, " n"], measured: Float[Tensor, " n"]) -> dict[str, float]:
    """Pearson correlation and median relative error |measured - predicted| / |measured| of two effect
    lists."""
    p, m = predicted.double().cpu(), measured.double().cpu()
    corr = float(torch.corrcoef(torch.stack([p, m]))[0, 1]) if len(p) > 1 else float("nan")
    rel = ((m - p).abs() / m.abs().clamp(min=1e-12)).median()
    return {"correlation": corr, "median_relative_error": float(rel)}
