"""Ground truth, measured: does the planted world compute what was planted, and do graphs and
interventions find it? `python -m part3_attribution_graphs.tools.ground_truth [--data DIR] [--pairs N]`
prints a markdown table.

1. **Accuracy** per mechanism and split (top-1 on `planted_facts`).
2. **Land latents, found by contrast**: over the single-hop and two-hop prompts (all towns, same template
   so positions line up), a latent at (layer, position) codes for the land when the land explains most
   of its activation's variance, and belongs to each land on whose prompts it fires (`planted.land_latents`).
   No label but the land goes in.
3. For **two-hop** (and single-hop) prompts:
   - *graph path*: the share of prompts whose pruned graph (`attribute`, default thresholds) holds a path
     from a token of the town through a kept latent of the prompt's land to the answer's logit;
   - *ablation*: the share where setting the land's latents to 0 (`intervene`) takes the answer out of
     the top 1;
   - *swap*: for prompt A (land a) and a town of another land b, asking the same question: the share
     where setting a's and b's latents to the values B's prompt gives them makes the model answer b's
     attribute; "latents" edits the latents only, "+ skip" also replaces the skip path's output at those
     layers and positions by B's (the skip carries what the MLP computes linearly from its input).
   Each of these runs in the graph's frozen model (attention patterns and norm scales frozen, MLP errors
   held; `intervene`'s default) and live (patterns and norms recomputed).
4. For **copy** prompts (held-out names, frozen model): with every latent at every position set to its
   value in another name's prompt, the share that answer that name, and the share that keep their own.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

from ..arguments import whole_number
from ..attribution import attribute
from ..interventions import intervene
from ..nodes import NodeType
from ..progress import tqdm
from ..replacement import skip_output
from ..worlds import planted
from ..worlds.planted import LatentSet, land_latents, latent_activations

__all__ = ["graph_has_path", "measure", "table", "main"]


def graph_has_path(result, sources: Iterable[int], via: set[tuple[int, int, int]], target_token: int) -> bool:
    """Whether the pruned graph has a path from an embedding at one of `sources` (positions) through a kept
    latent in `via` ((layer, position, latent)) to the logit of `target_token`."""
    kept = result.kept_indices.tolist()
    nodes = [result.graph.nodes[i] for i in kept]
    adj = result.pruned_matrix != 0  # adj[target, source]
    n = len(kept)

    def reach(start: list[int], forward: bool) -> set[int]:
        seen, stack = set(start), list(start)
        while stack:
            i = stack.pop()
            nxt = adj[:, i].nonzero().flatten() if forward else adj[i].nonzero().flatten()
            for j in nxt.tolist():
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        return seen

    src = [
        i for i in range(n) if nodes[i].node_type == NodeType.EMBEDDING and nodes[i].ctx_idx in set(sources)
    ]
    logit = [i for i in range(n) if nodes[i].node_type == NodeType.LOGIT and nodes[i].feature == target_token]
    if not src or not logit:
        return False
    down, up = reach(src, True), reach(logit, False)
    mids = [
        i
        for i in range(n)
        if nodes[i].node_type == NodeType.LATENT
        and (nodes[i].layer, nodes[i].ctx_idx, nodes[i].feature) in via
    ]
    return any(i in down and i in up for i in mids)


def _top1(logits: Tensor) -> int:
    return int(logits[0, -1].argmax())


@torch.no_grad()
def _swap(model, transcoders, fact_a, fact_b, latents: LatentSet, acts_b, with_skip: bool, live: bool) -> int:
    """The top-1 token of A's prompt with `latents` set to their values in B's prompt."""
    edits = [(layer, pos, f, float(acts_b[layer][pos, f])) for layer, pos, f in latents]
    kwargs = {"freeze_attention": not live}
    if not with_skip:
        return _top1(intervene(model, transcoders, fact_a.prompt, edits, **kwargs).logits)
    # The skip path's output at the swapped (layer, position)s becomes B's: skip(B's input) - skip(live input)
    # is added after the MLP output, in intervene's second forward pass (its first is the clean pass it
    # caches, which must stay clean).
    spots = sorted({(layer, pos) for layer, pos, _ in latents})
    names = [transcoders[layer].cfg.metadata.hook_name for layer, _ in spots]
    _, cache_b = model.run_with_cache(fact_b.prompt, names_filter=lambda n: n in names)
    live_in: dict[int, Tensor] = {}
    passes = [0]

    def count(x, hook):
        passes[0] += 1

    hooks: list = [("hook_embed", count)]
    for layer in sorted({layer for layer, _ in spots}):
        tc, read = transcoders[layer], transcoders[layer].cfg.metadata.hook_name
        positions = [pos for lay, pos in spots if lay == layer]

        def remember(x, hook, layer=layer):
            live_in[layer] = x[0].detach()

        def add(resid, hook, layer=layer, tc=tc, read=read, positions=positions):
            if passes[0] < 2:
                return resid
            resid = resid.clone()
            for pos in positions:
                delta = skip_output(tc, cache_b[read][0, pos]) - skip_output(tc, live_in[layer][pos])
                resid[:, pos] += delta.to(resid.dtype)
            return resid

        hooks += [(read, remember), (f"blocks.{layer}.hook_resid_post", add)]
    with model.hooks(fwd_hooks=hooks):
        return _top1(intervene(model, transcoders, fact_a.prompt, edits, **kwargs).logits)


def measure(
    model,
    transcoders,
    n_pairs: int = 2,
    n_graphs: int | None = None,
    explained: tuple[float, ...] = (0.5, 0.3),
    seed: int = 0,
) -> dict:
    """Every figure of the table (see the module docstring), as a dict; one set of rows per `explained`
    (`planted.land_latents`' `min_explained`).

    Interventions and graphs count only prompts the model answers right (an ablation cannot knock out an
    answer that was not there); each figure comes with its number of prompts (or pairs).
    """
    out: dict = {"accuracy": planted.planted_accuracy(model), "rows": {}, "latents": {}}
    for mech in ("two_hop", "single_hop"):
        facts = planted.planted_facts(mech)
        acts = latent_activations(model, transcoders, [f.prompt for f in facts])
        with torch.no_grad():
            top = model(model.to_tokens([f.prompt for f in facts]))[:, -1].argmax(-1).tolist()
        right = [top[i] == model.to_single_token(f.answer) for i, f in enumerate(facts)]
        town_pos = _town_positions(model, facts[0])
        same_question = defaultdict(list)
        for i, f in enumerate(facts):
            same_question[f.attribute].append(i)
        graphs: dict[int, object] = {}  # one attribution per prompt, read at every threshold
        for min_explained in explained:
            gen = torch.Generator().manual_seed(seed)
            found = land_latents(model, transcoders, facts, min_explained=min_explained)
            out["latents"][f"{mech}/{min_explained}"] = {land: len(v) for land, v in found.items()}
            for split in ("heldout", "train"):
                idx = [i for i, f in enumerate(facts) if f.split == split and right[i]]
                if not idx:
                    continue
                tally: dict[str, list[int]] = defaultdict(list)
                for i in tqdm(
                    idx[:n_graphs] if n_graphs else idx, desc=f"{mech}/{split} graphs", leave=False
                ):
                    if i not in graphs:
                        graphs[i] = attribute(model, transcoders, facts[i].prompt)
                    answer = model.to_single_token(facts[i].answer)
                    path = graph_has_path(graphs[i], town_pos, set(found[facts[i].intermediate]), answer)
                    tally["graph path"].append(int(path))
                for i in tqdm(idx, desc=f"{mech}/{split} interventions", leave=False):
                    f, mine = facts[i], found[facts[i].intermediate]
                    answer = model.to_single_token(f.answer)
                    for live in (False, True):
                        zeroed = [(layer, pos, k, 0.0) for layer, pos, k in mine]
                        ablated = intervene(model, transcoders, f.prompt, zeroed, freeze_attention=not live)
                        key = f"ablation/{'live' if live else 'frozen'}"
                        tally[key].append(int(_top1(ablated.logits) != answer))
                    others = [
                        j for j in same_question[f.attribute] if facts[j].intermediate != f.intermediate
                    ]
                    for p in torch.randperm(len(others), generator=gen)[:n_pairs].tolist():
                        b = facts[others[p]]
                        latents = sorted(set(mine) | set(found[b.intermediate]))
                        acts_b = {layer: a[others[p]] for layer, a in acts.items()}
                        target = model.to_single_token(b.answer)
                        for live in (False, True):
                            for with_skip in (False, True):
                                key = f"swap{' + skip' if with_skip else ''}/{'live' if live else 'frozen'}"
                                top1 = _swap(model, transcoders, f, b, latents, acts_b, with_skip, live)
                                tally[key].append(int(top1 == target))
                out["rows"][(mech, split, min_explained)] = {
                    k: (sum(v) / len(v), len(v)) for k, v in tally.items()
                }
    out["copy"] = _copy_swaps(model, transcoders)
    return out


def _copy_swaps(model, transcoders) -> dict[str, tuple[float, int]]:
    """Held-out copy prompts with every latent at every position set to its value in another name's prompt:
    the share that then answer the other name, and the share that keep their own (each pair both ways)."""
    facts = planted.planted_facts("copy", "heldout")
    acts = latent_activations(model, transcoders, [f.prompt for f in facts])
    other, own = [], []
    for i, f in enumerate(facts):
        j = (i + 1) % len(facts)
        edits = [
            (layer, pos, k, float(a[j, pos, k]))
            for layer, a in acts.items()
            for pos, k in ((a[i] > 0) | (a[j] > 0)).nonzero().tolist()
        ]
        top = _top1(intervene(model, transcoders, f.prompt, edits).logits)
        other.append(int(top == model.to_single_token(facts[j].answer)))
        own.append(int(top == model.to_single_token(f.answer)))
    return {"other name": (sum(other) / len(other), len(other)), "own name": (sum(own) / len(own), len(own))}


def _town_positions(model, fact: planted.PlantedFact) -> list[int]:
    """Positions of the town's words in this prompt (each occurs once)."""
    words = set(fact.entity.split())
    return [i for i, t in enumerate(model.to_str_tokens(fact.prompt)) if t.strip() in words]


def table(out: dict) -> str:
    """The measured figures as markdown: accuracy, then one row per prompt set and measure."""
    lines = ["| mechanism | train | held-out |", "|---|---:|---:|"]
    acc = out["accuracy"]
    for mech in planted.MECHANISMS:
        cells = [f"{100 * acc[k]:.0f}%" if (k := f"{mech}/{s}") in acc else "-" for s in ("train", "heldout")]
        lines.append(f"| {mech} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "| prompts (answered right) | land latents per land | measure | frozen | live |",
        "|---|---|---|---:|---:|",
    ]
    for (mech, split, min_explained), res in out["rows"].items():
        counts = out["latents"][f"{mech}/{min_explained}"].values()
        key = f"{mech}/{split}, land explains >= {min_explained:.0%}"
        found = f"{min(counts)}-{max(counts)}"
        g = res["graph path"]
        lines.append(f"| {key} | {found} | pruned graph: town -> land latent -> answer | {_pct(g)} | |")
        for what in ("ablation", "swap", "swap + skip"):
            lines.append(
                f"| {key} | | {what} | {_pct(res[what + '/frozen'])} | {_pct(res[what + '/live'])} |"
            )
    if "copy" in out:
        c = out["copy"]
        lines.append(
            f"| copy/heldout | - | every latent set to another name's prompt's values: answers that name / "
            f"keeps its own | {_pct(c['other name'])} / {_pct(c['own name'])} | |"
        )
    return "\n".join(lines)


def _pct(figure: tuple[float, int]) -> str:
    return f"{100 * figure[0]:.0f}% (n={figure[1]})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default=None, help="a folder written by tools.train_planted (default: shipped)"
    )
    parser.add_argument("--pairs", type=whole_number(1), default=2, help="swap partners per prompt")
    parser.add_argument(
        "--graphs", type=whole_number(1), default=None, help="at most this many graphs per mechanism"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    planted.load_planted_world(data_dir=args.data)  # once first, so the timing below leaves imports out
    t0 = time.perf_counter()
    model, transcoders = planted.load_planted_world(data_dir=args.data)
    print(f"load_planted_world: {time.perf_counter() - t0:.2f} s")
    out = measure(model, transcoders, n_pairs=args.pairs, n_graphs=args.graphs)
    print(table(out))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return out


if __name__ == "__main__":
    main()
