"""The case study: from a graph to a hypothesis to an intervention that tests it.

- `strongest_path` reads the pruned graph: the chain of nodes from an input token to the top logit
  whose edges carry the largest share of each other's input (a dynamic programme over the DAG).
- `swap_group` tests a hypothesis about what a set of latents carries: run prompt A with those
  latents set to the values prompt B gives them. If they carry B's group, the model answers B's
  attribute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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

__all__ = ["strongest_path", "path_shares", "firing_rates", "swap_group"]

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


# Guarded here rather than with decorators: the notebook shows these exercises' sources as written above.
# (strongest_path and path_shares read a pruned matrix only, and are graded on hand-made stand-ins.)
firing_rates = guarded(model="model", transcoders="transcoders")(firing_rates)
swap_group = guarded(model="model", transcoders="transcoders")(swap_group)
