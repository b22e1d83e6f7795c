"""The case study: from a graph to a hypothesis to an intervention that tests it.

- `strongest_path` reads the pruned graph: the chain of nodes from an input token to the top logit
  whose edges carry the largest share of each other's input (a dynamic programme over the DAG).
- `swap_group` tests a hypothesis about what a set of latents carries: run prompt A with those
  latents set to the values prompt B gives them. If they carry B's group, the model answers B's
  attribute.
- `score_graph` scores one graph against the planted truth (kept land latents against the candidates,
  and whether the strongest path passes through a latent of the question's own land);
  `same_site_control` draws the random latents a swap is compared with; `misleading_question` picks,
  by a fixed rule, the question whose graph's headline is most confidently wrong.
- `group_subspace` and `subspace_swap` swap the model's own variable, with no dictionary: the part of
  the residual stream spanned by the groups' mean activations.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from sae_lens import HookedSAETransformer
from torch import Tensor

from .guard import guarded
from .interventions import clean_run, intervene
from .nodes import NodeType
from .pruning import normalize_matrix
from .replacement import Transcoder
from .result import AttributionResult
from .worlds.planted import latent_activations

__all__ = [
    "strongest_path",
    "path_shares",
    "firing_rates",
    "swap_group",
    "GraphScore",
    "score_graph",
    "enrichment",
    "misleading_question",
    "same_site_control",
    "group_subspace",
    "subspace_site",
    "subspace_swap",
]

LatentSet = list[tuple[int, int, int]]  # (layer, position, latent)


# --------------------------------------------------------------------------------------------------
# Exercise: the strongest path
# --------------------------------------------------------------------------------------------------


def strongest_path(result: AttributionResult) -> tuple[list[int], float]:
    """The strongest path of the pruned graph from an input token (an embedding node) to the top logit.

    An edge s -> t has normalised weight `B[t, s] = |A[t, s]| / sum_s' |A[t, s']|` (A = the pruned matrix,
    target by source): the share of t's incoming attribution that comes from s. A path's strength is the
    product of its edges' normalised weights; the strongest path maximises it. Direct edges from an
    embedding to a logit are left out (they say that a token matters, not how), so the path passes
    through at least one latent.

    Returns:
        The path as indices into `result.graph.nodes`, from the embedding node to the top logit node (the
        first logit node: logit nodes come most probable first), and its strength.
    """
    B = normalize_matrix(result.pruned_matrix)
    kinds = [result.graph.nodes[i].node_type for i in result.kept_indices.tolist()]
    is_input = torch.tensor([kind == NodeType.EMBEDDING for kind in kinds], device=B.device)
    is_logit = torch.tensor([kind == NodeType.LOGIT for kind in kinds], device=B.device)
    B = B * ~(is_logit[:, None] & is_input[None, :])  # no direct edge: a path passes through a latent
    end = kinds.index(NodeType.LOGIT)
    # best[t]: the strength of the strongest path from any input to t (0: none yet). One sweep extends every
    # node's best path by one edge, all nodes at once; once a sweep changes nothing, every best is final.
    best = is_input.to(B.dtype)
    for _ in range(len(kinds)):
        via, parent = (B * best).max(dim=1)  # over sources s: B[t, s] * best[s]
        new = torch.where(is_input, best, via)
        if torch.equal(new, best):
            break
        best = new
    if best[end] == 0:
        raise ValueError("The pruned graph has no path from an input token to the top logit.")
    path = [end]
    while not is_input[path[-1]]:
        path.append(int(parent[path[-1]]))
    return result.kept_indices[path[::-1]].tolist(), float(best[end])


def path_shares(result: AttributionResult, path: Sequence[int]) -> list[float]:
    """The normalised weight of each edge of a path (indices into `result.graph.nodes`); their product is
    the path's strength."""
    where = {node: k for k, node in enumerate(result.kept_indices.tolist())}
    missing = [node for node in path if node not in where]
    if missing:
        raise ValueError(f"Nodes {missing} are not in the pruned graph (result.kept_indices).")
    local = torch.tensor([where[node] for node in path], dtype=torch.long)
    B = normalize_matrix(result.pruned_matrix.double())
    return B[local[1:], local[:-1]].tolist()


# --------------------------------------------------------------------------------------------------
# Reading the latents: which fire for which group? (`worlds.planted.land_latents` finds a land's latents)
# --------------------------------------------------------------------------------------------------


def firing_rates(
    model: HookedSAETransformer,
    transcoders: Mapping[int, Transcoder],
    prompts: Sequence[str],
    groups: Sequence[str],
    latents: LatentSet,
) -> tuple[list[str], Float[Tensor, "n_groups n_latents"]]:
    """`(group names, rates)`: how often each latent fires on each group's prompts (one template)."""
    acts = latent_activations(model, dict(transcoders), list(prompts))
    labels = sorted(set(groups))
    which = torch.tensor([labels.index(g) for g in groups])
    fired = torch.stack([acts[layer][:, pos, f] > 0 for layer, pos, f in latents], dim=1).float()
    return labels, torch.stack([fired[which == k].mean(0) for k in range(len(labels))])


# --------------------------------------------------------------------------------------------------
# Exercise: the swap
# --------------------------------------------------------------------------------------------------


def swap_group(
    model: HookedSAETransformer,
    transcoders: Mapping[int, Transcoder],
    prompt_a: str,
    prompt_b: str,
    latents: Sequence[tuple[int, int, int]],
) -> Float[Tensor, " d_vocab"]:
    """Prompt A's next-token logits with each latent `(layer, position, latent)` set to its value on prompt B.

    The prompts have the same number of tokens (e.g. one template, two entities), so a position means the
    same in both. A latent silent on B is set to 0: switched off. Runs `intervene` with its defaults (the
    graph's replacement model: attention patterns and norm scales frozen, MLP errors held).
    """
    run_a, run_b = clean_run(model, transcoders, prompt_a), clean_run(model, transcoders, prompt_b)
    if run_a.tokens.shape != run_b.tokens.shape:
        raise ValueError(
            f"The prompts have {run_a.tokens.shape[1]} and {run_b.tokens.shape[1]} tokens: a swap needs "
            "prompts of the same length, so that a position means the same in both."
        )
    edits = [(layer, pos, f, float(run_b.acts[layer][pos, f])) for layer, pos, f in latents]
    return intervene(model, transcoders, run_a, edits).logits[0, -1]


# --------------------------------------------------------------------------------------------------
# The graph against the truth, over many questions
# --------------------------------------------------------------------------------------------------


def _latent_key(node) -> tuple[int, int, int]:
    return (int(node.layer), int(node.ctx_idx), int(node.feature))


@dataclass(frozen=True)
class GraphScore:
    """One graph scored against the planted truth.

    `kept` / `kept_truth`: latents the pruned graph keeps, and how many of them are planted latents (of any
    group); `candidates` / `candidates_truth`: the same over every latent the graph could have kept (all
    its latent nodes). `path_through_own`: whether the strongest path passes through a latent of the
    question's own group; `path` its node indices, `strength` its strength.
    """

    kept: int
    kept_truth: int
    candidates: int
    candidates_truth: int
    path_through_own: bool
    path: tuple[int, ...]
    strength: float


def score_graph(
    result: AttributionResult,
    path: Sequence[int],
    strength: float,
    truth: Mapping[str, Sequence[tuple[int, int, int]]],
    own: str,
) -> GraphScore:
    """Score a graph and its strongest path (`strongest_path(result)`) against `truth`, `{group: [(layer,
    position, latent)]}` (e.g. `land_latents`), for a question about group `own`."""
    every = {x for latents in truth.values() for x in latents}
    mine = set(truth[own])
    kept_nodes = [result.graph.nodes[i] for i in result.kept_indices.tolist()]
    kept = [_latent_key(n) for n in kept_nodes if n.node_type == NodeType.LATENT]
    cands = [_latent_key(n) for n in result.graph.nodes if n.node_type == NodeType.LATENT]
    nodes = [result.graph.nodes[i] for i in path]
    on_path = [_latent_key(n) for n in nodes if n.node_type == NodeType.LATENT]
    return GraphScore(
        kept=len(kept),
        kept_truth=sum(x in every for x in kept),
        candidates=len(cands),
        candidates_truth=sum(x in every for x in cands),
        path_through_own=any(x in mine for x in on_path),
        path=tuple(int(i) for i in path),
        strength=float(strength),
    )


def enrichment(scores: Sequence[GraphScore]) -> tuple[float, float, float]:
    """`(precision, base rate, enrichment)` pooled over graphs: the share of kept latents that are planted
    latents, the same share among all candidate latents, and their ratio (1: the graph picks them at
    chance)."""
    kept, truth = sum(s.kept for s in scores), sum(s.kept_truth for s in scores)
    cands, cands_truth = sum(s.candidates for s in scores), sum(s.candidates_truth for s in scores)
    precision = truth / kept if kept else 0.0
    base = cands_truth / cands if cands else 0.0
    return precision, base, precision / base if base else float("nan")


def misleading_question(scores: Sequence[GraphScore], caught: Sequence[bool] | None = None) -> int:
    """The index of the question whose graph misleads most, by a rule fixed in advance: among the graphs
    whose strongest path avoids every latent of the question's own group, the one whose path is strongest
    (the most confident wrong headline), preferring questions where `caught` is True (e.g. the swap of the
    group's latents did move the answer there: an intervention can then show what the path missed); if
    every path passes through its group, the graph whose kept latents hold the smallest share of planted
    latents."""
    if not scores:
        raise ValueError("No scores: score at least one graph (score_graph).")
    if caught is not None and len(caught) != len(scores):
        raise ValueError(f"caught has {len(caught)} entries for {len(scores)} scores: give one per question.")
    wrong = [k for k, s in enumerate(scores) if not s.path_through_own]
    if wrong:
        preferred = [k for k in wrong if caught is not None and caught[k]] or wrong
        return max(preferred, key=lambda k: scores[k].strength)
    return min(range(len(scores)), key=lambda k: scores[k].kept_truth / max(scores[k].kept, 1))


def same_site_control(
    latents: Sequence[tuple[int, int, int]],
    active: Mapping[int, Float[Tensor, "seq d_sae"]],
    rng: random.Random,
) -> LatentSet:
    """Random latents in place of `latents`: at each (layer, position) site as many as `latents` has there,
    drawn from the latents active there (`active`: activations by layer, e.g. a clean run's `acts`, or
    the larger of two prompts') that are not among `latents`. A site with too few gives all it has."""
    chosen = set(latents)
    sites: dict[tuple[int, int], int] = {}
    for layer, pos, _ in latents:
        sites[layer, pos] = sites.get((layer, pos), 0) + 1
    out: LatentSet = []
    for (layer, pos), n in sorted(sites.items()):
        pool = [
            f for f in (active[layer][pos] > 0).nonzero().flatten().tolist() if (layer, pos, f) not in chosen
        ]
        out += [(layer, pos, f) for f in sorted(rng.sample(pool, min(n, len(pool))))]
    return out


# --------------------------------------------------------------------------------------------------
# The check that needs no dictionary: swap the model's own variable
# --------------------------------------------------------------------------------------------------


def subspace_site(truth: Mapping[str, Sequence[tuple[int, int, int]]]) -> tuple[int, int]:
    """`(layer, position)` where the planted latents say the variable is first written: their lowest layer,
    and the position there holding the most of them (the residual stream after that layer)."""
    every = {x for latents in truth.values() for x in latents}
    if not every:
        raise ValueError("truth holds no latents: there is no site to read the variable at.")
    layer = min(layer for layer, _, _ in every)
    count: dict[int, int] = {}
    for at, pos, _ in every:
        if at == layer:
            count[pos] = count.get(pos, 0) + 1
    return layer, max(count, key=lambda p: (count[p], -p))


@torch.no_grad()
def _resid(model: HookedSAETransformer, tokens: Tensor, layer: int) -> Float[Tensor, "n seq d_model"]:
    name = f"blocks.{layer}.hook_resid_post"
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    return cache[name]


@torch.no_grad()
def group_subspace(
    model: HookedSAETransformer, prompts: Sequence[str], groups: Sequence[str], layer: int, position: int
) -> Float[Tensor, "d_model k"]:
    """An orthonormal basis of the span of the groups' mean residual streams (after `layer`, at `position`),
    each centred on the mean over groups: with g groups, g - 1 directions, found from these prompts (one
    template) alone."""
    resid = _resid(model, model.to_tokens(list(prompts)), layer)[:, position].double()
    names = sorted(set(groups))
    means = torch.stack([resid[[g == name for g in groups]].mean(0) for name in names])
    centred = means - means.mean(0)
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)
    keep = s > s.max() * 1e-6
    return vh[keep].T.to(resid.dtype)


@torch.no_grad()
def subspace_swap(
    model: HookedSAETransformer,
    prompts_a: Sequence[str],
    prompts_b: Sequence[str],
    basis: Float[Tensor, "d_model k"],
    layer: int,
    position: int,
) -> Float[Tensor, "n d_vocab"]:
    """Each prompt A's next-token logits with its residual stream after `layer` at `position` given B's
    component in the span of `basis` (orthonormal columns), the rest kept: `x_A + (x_B - x_A) Q Qᵀ`.
    The live model, no transcoder; prompts of one length, paired in order."""
    tokens_a, tokens_b = model.to_tokens(list(prompts_a)), model.to_tokens(list(prompts_b))
    if tokens_a.shape != tokens_b.shape:
        raise ValueError(
            f"prompts_a and prompts_b give token tensors {tuple(tokens_a.shape)} and "
            f"{tuple(tokens_b.shape)}: pair prompts of one template (same length), one B for each A."
        )
    x_b = _resid(model, tokens_b, layer)[:, position]
    Q = basis.to(x_b.device, x_b.dtype)

    def swap(resid: Float[Tensor, "n seq d_model"], hook) -> Float[Tensor, "n seq d_model"]:
        resid = resid.clone()
        resid[:, position] += (x_b - resid[:, position]) @ Q @ Q.T
        return resid

    return model.run_with_hooks(tokens_a, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", swap)])[:, -1]


# Guarded here rather than with decorators: the notebook shows these exercises' sources as written above.
# (strongest_path and path_shares read a pruned matrix only, and are graded on hand-made stand-ins.)
firing_rates = guarded(model="model", transcoders="transcoders")(firing_rates)
swap_group = guarded(model="model", transcoders="transcoders")(swap_group)
group_subspace = guarded(model="model", counts={"layer": 0, "position": 0})(group_subspace)
subspace_swap = guarded(model="model", counts={"layer": 0, "position": 0})(subspace_swap)
