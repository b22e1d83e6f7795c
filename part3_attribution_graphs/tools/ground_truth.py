"""Ground truth, measured: does the planted world compute what was planted, and do graphs and
interventions find it? `python -m part3_attribution_graphs.tools.ground_truth [--data DIR] [--pairs N]
[--figure FILE]` prints a markdown table and writes the threshold sweep as a plotly figure (HTML).

Every definition is fixed here and in `planted`, before any intervention is run:

- **Land latents** (`planted.land_latents`): on *training* two-hop prompts only, a latent at (layer, position)
  is a land's when it fires on >= `planted.MIN_IN` of that land's prompts and <= `planted.MAX_OUT` of the
  other lands'. **The planted site** is `planted.LAND_SITE` (layer 0, the town's position: where the recipe
  makes MLP 0 write the land); the interventions edit the land latents at that site.
- **Pairs**: each question A gets `n_pairs` partners B (same attribute, a town of another land), drawn by a
  seeded generator before anything is measured.
- **Swap**: A's and B's land latents at the site set to their values in B's prompt; a hit when the model then
  answers B's answer. **Ablation**: A's land latents at the site set to 0; a hit when A's answer is no
  longer the top 1. **Random control**: the same number of other latents at the same site (seeded draw),
  edited the same way. **Whole site**: every latent at the site (what the dictionary can do there at most).
- **Modes**: *frozen* (the graph's model: attention patterns and norm scales frozen, MLP errors held,
  `intervene`'s default), *live* (attention and norms recomputed, errors held), *real MLPs* (live, the real
  MLPs run and the edits are added to them: no error term held).
- **Subspace swap** (no dictionary, the upper bound): the land's own variable in the model, the span of the
  8 land means of MLP 0's output at the town (training prompts), 7 dimensions; A's component there replaced
  by B's, in the plain model. Control: a random 7-dimensional subspace.
- **The graph against the truth** (`attribute` defaults, every held-out question): *precision*, the share of
  kept latents that are land latents of the question's land; *base rate*, the same share among all active
  latents (the candidates); *enrichment* = precision / base rate; *recall*, the share of the question's
  active land latents that are kept; *strongest path* (`case_study.strongest_path`) through a land latent of
  the question's land.
- **Threshold sweep**: swap and ablation rates (frozen) and the random control for `max_out` from 0 to 0.5.
- **Opposites**: "opposite" latents at the last position fire on >= `MIN_IN` of the opposite training prompts
  (all their templates) and <= `MAX_OUT` of every other training prompt; ablating them on held-out-template
  prompts: a hit when the antonym is no longer the top 1. **Copying**: the name's value vectors (every layer's
  attention, at the name's position) replaced by another name's: a hit when the model answers that name.

Only prompts the model answers right count; each figure comes with its number of prompts (or pairs).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch

from ..arguments import whole_number
from ..attribution import attribute
from ..case_study import strongest_path
from ..checks import check_transcoders
from ..guard import guarded
from ..interventions import intervene
from ..nodes import NodeType
from ..progress import tqdm
from ..worlds import planted
from ..worlds.planted import LatentSet, land_latents, latent_activations

__all__ = ["MODES", "SWEEP", "graph_has_path", "measure", "table", "sweep_figure", "main"]

MODES = ("frozen", "live", "real MLPs")
SWEEP = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # max_out values of the threshold sweep
KINDS = ("planted", "random", "whole site")


@guarded(result="result", counts={"target_token": 0})
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


def _top1(model, transcoders, prompt: str, edits: list, mode: str) -> int:
    result = intervene(
        model, transcoders, prompt, edits, freeze_attention=mode == "frozen", hold_errors=mode != "real MLPs"
    )
    return int(result.logits[0, -1].argmax())


def _rate(hits: list[int]) -> tuple[float, int]:
    return (sum(hits) / len(hits), len(hits)) if hits else (float("nan"), 0)


def _answered(model, facts: list[planted.PlantedFact]) -> list[bool]:
    with torch.no_grad():
        top = model(model.to_tokens([f.prompt for f in facts]))[:, -1].argmax(-1).tolist()
    return [t == model.to_single_token(f.answer) for t, f in zip(top, facts)]


def _pairs(facts, idx: list[int], n_pairs: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """For each question in `idx`, `n_pairs` partners: the same attribute, a town of another land."""
    pairs = []
    for i in idx:
        others = [
            j
            for j, f in enumerate(facts)
            if f.attribute == facts[i].attribute and f.intermediate != facts[i].intermediate
        ]
        pairs += [(i, others[p]) for p in torch.randperm(len(others), generator=gen)[:n_pairs].tolist()]
    return pairs


def _random_like(latents: LatentSet, avoid: set, d_sae: int, gen: torch.Generator) -> LatentSet:
    """As many other latents at the same (layer, position)s, drawn without replacement."""
    out, taken = [], set(avoid)
    for layer, pos, _ in latents:
        while (pick := (layer, pos, int(torch.randint(d_sae, (1,), generator=gen)))) in taken:
            pass
        taken.add(pick)
        out.append(pick)
    return out


def _at_site(found: dict[str, LatentSet], site: tuple[int, int]) -> dict[str, LatentSet]:
    return {land: [x for x in v if (x[0], x[1]) == site] for land, v in found.items()}


def _planted_args(a: dict) -> None:
    if not planted.is_planted_model(a["model"]):
        raise ValueError(
            "The ground truth is the planted world's facts, but the model is another world's: pass the model "
            "and transcoders of load_planted_world()."
        )


# Each row of the table measures the planted world: its model (and transcoders) are checked as measure's.
_ROW = dict(model="model", counts={"seed": 0}, check=_planted_args)


@guarded(**_ROW, transcoders="transcoders")
def intervention_rates(
    model, transcoders, facts, idx: list[int], pairs: list[tuple[int, int]], found, modes=MODES, seed: int = 0
) -> dict[str, tuple[float, int]]:
    """Swap and ablation rates of the planted site's land latents, the random control and the whole site,
    per mode (keys like "swap/planted/frozen")."""
    site = planted.LAND_SITE
    mine = _at_site(found, site)
    acts = latent_activations(model, transcoders, [f.prompt for f in facts])
    d_sae = transcoders[site[0]].cfg.d_sae
    every = [(site[0], site[1], k) for k in range(d_sae)]
    all_land = {x for v in found.values() for x in v}
    gen = torch.Generator().manual_seed(seed)
    tally: dict[str, list[int]] = defaultdict(list)
    for i, j in tqdm(pairs, desc="swaps", leave=False):
        a, b = facts[i], facts[j]
        planted_set = sorted(set(mine[a.intermediate]) | set(mine[b.intermediate]))
        sets = {
            "planted": planted_set,
            "random": _random_like(planted_set, all_land, d_sae, gen),
            "whole site": every,
        }
        target = model.to_single_token(b.answer)
        for kind, latents in sets.items():
            edits = [(layer, pos, k, float(acts[layer][j, pos, k])) for layer, pos, k in latents]
            for mode in modes:
                tally[f"swap/{kind}/{mode}"].append(
                    int(_top1(model, transcoders, a.prompt, edits, mode) == target)
                )
    for i in tqdm(idx, desc="ablations", leave=False):
        a = facts[i]
        sets = {
            "planted": mine[a.intermediate],
            "random": _random_like(mine[a.intermediate], all_land, d_sae, gen),
            "whole site": every,
        }
        answer = model.to_single_token(a.answer)
        for kind, latents in sets.items():
            edits = [(layer, pos, k, 0.0) for layer, pos, k in latents]
            for mode in modes:
                tally[f"ablation/{kind}/{mode}"].append(
                    int(_top1(model, transcoders, a.prompt, edits, mode) != answer)
                )
    return {k: _rate(v) for k, v in tally.items()}


@guarded(**_ROW)
@torch.no_grad()
def subspace_swaps(model, facts, pairs: list[tuple[int, int]], seed: int = 0) -> dict[str, tuple[float, int]]:
    """The model's own land variable, no dictionary: at the planted site, MLP 0's output projected on the span
    of the (centred) land means over training prompts; A's component replaced by B's. Control: a random
    subspace of the same dimension."""
    layer, pos = planted.LAND_SITE
    hook = f"blocks.{layer}.hook_mlp_out"
    _, cache = model.run_with_cache(model.to_tokens([f.prompt for f in facts]), names_filter=hook)
    out = cache[hook][:, pos].double()  # (n, d_model)
    lands = sorted({f.intermediate for f in facts})
    train = torch.tensor([f.split == "train" for f in facts])
    means = torch.stack(
        [out[train & torch.tensor([f.intermediate == g for f in facts])].mean(0) for g in lands]
    )
    basis = torch.linalg.qr((means - means.mean(0)).T).Q[:, : len(lands) - 1]  # (d_model, 7)
    gen = torch.Generator().manual_seed(seed)
    rand = torch.linalg.qr(torch.randn(out.shape[1], basis.shape[1], generator=gen, dtype=torch.float64)).Q
    tally: dict[str, list[int]] = defaultdict(list)
    for name, Q in (("land subspace", basis), ("random subspace", rand)):
        for i, j in pairs:

            def patch(x, hook, i=i, j=j, Q=Q):
                x = x.clone()
                delta = (out[j] - out[i]) @ Q @ Q.T
                x[:, pos] += delta.to(x.dtype)
                return x

            with model.hooks(fwd_hooks=[(hook, patch)]):
                top = int(model(facts[i].prompt)[0, -1].argmax())
            tally[name].append(int(top == model.to_single_token(facts[j].answer)))
    return {k: _rate(v) for k, v in tally.items()}


@guarded(model="model", transcoders="transcoders", check=_planted_args)
def graph_scores(model, transcoders, facts, idx: list[int], found) -> dict[str, tuple[float, int]]:
    """The default graph of each question against the truth: precision, base rate, enrichment, recall and the
    strongest path (see the module docstring)."""
    kept_land, kept_all, cand_land, cand_all, recall, path, has_path = [], [], [], [], [], [], []
    for i in tqdm(idx, desc="graphs", leave=False):
        f = facts[i]
        truth = set(found[f.intermediate])
        result = attribute(model, transcoders, f.prompt)
        nodes = result.graph.nodes
        keys = [
            (n.layer, n.ctx_idx, n.feature) for n in nodes if n.node_type == NodeType.LATENT
        ]  # every candidate latent (active, top_k per site)
        kept = [
            (nodes[k].layer, nodes[k].ctx_idx, nodes[k].feature)
            for k in result.kept_indices.tolist()
            if nodes[k].node_type == NodeType.LATENT
        ]
        acts = latent_activations(model, transcoders, [f.prompt])
        active = {x for x in truth if acts[x[0]][0, x[1], x[2]] > 0}
        kept_land.append(sum(x in truth for x in kept))
        kept_all.append(len(kept))
        cand_land.append(sum(x in truth for x in keys))
        cand_all.append(len(keys))
        recall += [int(x in set(kept)) for x in active]
        try:
            p, _ = strongest_path(result)
            on = [nodes[k] for k in p if nodes[k].node_type == NodeType.LATENT]
            path.append(int(any((n.layer, n.ctx_idx, n.feature) in truth for n in on)))
            has_path.append(1)
        except ValueError:  # no path from an input to the top logit
            path.append(0)
            has_path.append(0)
    precision = sum(kept_land) / max(1, sum(kept_all))
    base = sum(cand_land) / max(1, sum(cand_all))
    return {
        "precision": (precision, sum(kept_all)),
        "base rate": (base, sum(cand_all)),
        "enrichment": (precision / base if base else float("nan"), len(idx)),
        "recall": _rate(recall),
        "strongest path through the land": _rate(path),
        "graphs with a path": _rate(has_path),
    }


@guarded(**_ROW, transcoders="transcoders")
def threshold_sweep(
    model, transcoders, facts, idx: list[int], pairs, values=SWEEP, seed: int = 0
) -> dict[float, dict[str, tuple[float, int]]]:
    """Swap, ablation and random-control rates (frozen) and latents per land, for each `max_out`."""
    out = {}
    for max_out in tqdm(values, desc="sweep", leave=False):
        found = land_latents(model, transcoders, facts, max_out=max_out)
        rates = intervention_rates(model, transcoders, facts, idx, pairs, found, modes=("frozen",), seed=seed)
        counts = [len(v) for v in _at_site(found, planted.LAND_SITE).values()]
        out[max_out] = {**rates, "latents per land": (sum(counts) / len(counts), len(counts))}
    return out


def sweep_figure(sweep: dict[float, dict[str, tuple[float, int]]]):
    """The threshold sweep as a plotly figure: rates against `max_out`, the fixed rule's value marked."""
    import plotly.graph_objects as go

    xs = list(sweep)
    fig = go.Figure()
    for key, name in (
        ("swap/planted/frozen", "swap, land latents"),
        ("ablation/planted/frozen", "ablation, land latents"),
        ("swap/random/frozen", "swap, random latents (control)"),
        ("ablation/random/frozen", "ablation, random latents (control)"),
    ):
        fig.add_trace(
            go.Scatter(x=xs, y=[100 * sweep[x][key][0] for x in xs], mode="lines+markers", name=name)
        )
    fig.add_vline(x=planted.MAX_OUT, line_dash="dot", annotation_text="the fixed rule")
    fig.update_layout(
        title="Held-out two-hop questions: rates against the selectivity threshold (frozen model)",
        xaxis_title="max_out: largest share of other lands' training prompts a land latent may fire on",
        yaxis_title="% of held-out pairs / questions",
        template="plotly_white",
    )
    return fig


@guarded(model="model", transcoders="transcoders", check=_planted_args)
def opposite_rates(model, transcoders) -> dict[str, tuple[float, int]]:
    """Opposite latents at the last position (fixed rule) and their ablation on the held-out template."""
    train = planted.planted_facts(split="train")
    last = {}
    for f in train:  # one batch per length; the last position of each
        last.setdefault(len(model.to_str_tokens(f.prompt)), []).append(f)
    fired, is_opp = [], []
    for group in last.values():
        acts = latent_activations(model, transcoders, [f.prompt for f in group])
        fired.append(torch.cat([a[:, -1:] > 0 for a in acts.values()], dim=1))  # (n, n_layers, d_sae)
        is_opp += [f.mechanism == "opposite" for f in group]
    fired_t, opp = torch.cat(fired).float(), torch.tensor(is_opp)
    selective = (fired_t[opp].mean(0) >= planted.MIN_IN) & (fired_t[~opp].mean(0) <= planted.MAX_OUT)
    layers = sorted(transcoders)
    found = [(layers[li], k) for li, k in selective.nonzero().tolist()]
    held = [f for f in planted.planted_facts("opposite", "heldout")]
    held = [f for f, ok in zip(held, _answered(model, held)) if ok]
    tally: dict[str, list[int]] = defaultdict(list)
    for f in held:
        last_pos = len(model.to_str_tokens(f.prompt)) - 1
        edits = [(layer, last_pos, k, 0.0) for layer, k in found]
        for mode in ("frozen", "live"):
            top = _top1(model, transcoders, f.prompt, edits, mode)
            tally[f"ablation/{mode}"].append(int(top != model.to_single_token(f.answer)))
    return {"latents": (len(found), 1), **{k: _rate(v) for k, v in tally.items()}}


@guarded(model="model", check=_planted_args)
@torch.no_grad()
def copy_swaps(model) -> dict[str, tuple[float, int]]:
    """Held-out copy prompts: the name's value vectors (every layer, at its position) set to another
    name's."""
    facts = planted.planted_facts("copy", "heldout")
    tokens = model.to_tokens([f.prompt for f in facts])
    pos = model.to_str_tokens(facts[0].prompt).index(" " + facts[0].entity)
    names = [f"blocks.{layer}.attn.hook_v" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    other, own = [], []
    for i, f in enumerate(facts):
        j = (i + 1) % len(facts)

        def patch(v, hook, j=j):
            v = v.clone()
            v[:, pos] = cache[hook.name][j, pos]
            return v

        with model.hooks(fwd_hooks=[(n, patch) for n in names]):
            top = int(model(tokens[i : i + 1])[0, -1].argmax())
        other.append(int(top == model.to_single_token(facts[j].answer)))
        own.append(int(top == model.to_single_token(f.answer)))
    return {"answers the other name": _rate(other), "keeps its own": _rate(own)}


def _measure_args(a: dict) -> None:
    _planted_args(a)
    # Graphs are attributed over every layer: a partial dict would fail only after the interventions ran.
    check_transcoders(a["model"], a["transcoders"])


@guarded(
    model="model",
    counts={"n_pairs": 1, "n_graphs": 1, "seed": 0, "n_prompts": 1},
    flags=("sweep",),
    check=_measure_args,
)
def measure(
    model,
    transcoders,
    n_pairs: int = 2,
    n_graphs: int | None = None,
    sweep: bool = True,
    seed: int = 0,
    n_prompts: int | None = None,
) -> dict:
    """Every figure of the table (see the module docstring), as a dict; `n_prompts` (a shortened run) takes at
    most that many questions per split."""
    out: dict = {"accuracy": planted.planted_accuracy(model), "rows": {}}
    facts = planted.planted_facts("two_hop")
    found = land_latents(model, transcoders, facts)
    site = _at_site(found, planted.LAND_SITE)
    out["latents per land"] = {land: (len(site[land]), len(found[land])) for land in found}
    right = _answered(model, facts)
    gen = torch.Generator().manual_seed(seed)
    for split in ("heldout", "train"):
        idx = [i for i, f in enumerate(facts) if f.split == split and right[i]][:n_prompts]
        pairs = _pairs(facts, idx, n_pairs, gen)
        row = intervention_rates(model, transcoders, facts, idx, pairs, found, seed=seed)
        row.update(subspace_swaps(model, facts, pairs, seed))
        if split == "heldout":
            row.update(graph_scores(model, transcoders, facts, idx[:n_graphs] if n_graphs else idx, found))
            if sweep:
                out["sweep"] = threshold_sweep(model, transcoders, facts, idx, pairs, seed=seed)
        out["rows"][f"two_hop/{split}"] = row
    out["opposite"] = opposite_rates(model, transcoders)
    out["copy"] = copy_swaps(model)
    return out


def _pct(figure: tuple[float, int]) -> str:
    return f"{100 * figure[0]:.0f}% (n={figure[1]})"


def table(out: dict) -> str:
    """The measured figures as markdown."""
    lines = ["| mechanism | train | held-out |", "|---|---:|---:|"]
    acc = out["accuracy"]
    for mech in planted.MECHANISMS:
        cells = [f"{100 * acc[k]:.0f}%" if (k := f"{mech}/{s}") in acc else "-" for s in ("train", "heldout")]
        lines.append(f"| {mech} | {cells[0]} | {cells[1]} |")
    counts = out["latents per land"]
    at_site = [a for a, _ in counts.values()]
    anywhere = [b for _, b in counts.values()]
    lines += [
        "",
        f"Land latents per land: {min(at_site)}-{max(at_site)} at the planted site (layer "
        f"{planted.LAND_SITE[0]}, the town), {min(anywhere)}-{max(anywhere)} anywhere.",
        "",
        "| two-hop questions | intervention | latents | frozen | live | real MLPs |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, row in out["rows"].items():
        for what in ("swap", "ablation"):
            for kind in KINDS:
                cells = [_pct(row[f"{what}/{kind}/{m}"]) for m in MODES]
                lines.append(f"| {name} | {what} | {kind} | " + " | ".join(cells) + " |")
        for kind in ("land subspace", "random subspace"):
            lines.append(f"| {name} | swap, no dictionary | {kind} (7 dims) | | | {_pct(row[kind])} |")
    row = out["rows"]["two_hop/heldout"]
    lines += ["", "| the default graph, every held-out two-hop question | |", "|---|---:|"]
    for key in ("precision", "base rate", "recall", "strongest path through the land", "graphs with a path"):
        lines.append(f"| {key} | {_pct(row[key])} |")
    lines.append(f"| enrichment (precision / base rate) | {row['enrichment'][0]:.1f}x |")
    opp, cp = out["opposite"], out["copy"]
    lines += [
        "",
        "| other mechanisms (held-out) | frozen | live |",
        "|---|---:|---:|",
        f"| opposite: {opp['latents'][0]} opposite latents at the last position ablated | "
        f"{_pct(opp['ablation/frozen'])} | {_pct(opp['ablation/live'])} |",
        f"| copy: the name's value vectors set to another name's: answers that name / keeps its own | "
        f"{_pct(cp['answers the other name'])} / {_pct(cp['keeps its own'])} | |",
    ]
    if "sweep" in out:
        lines += ["", "| max_out | latents per land | swap | ablation | random swap | random ablation |"]
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for x, r in out["sweep"].items():
            cells = [_pct(r[k]) for k in ("swap/planted/frozen", "ablation/planted/frozen")]
            cells += [_pct(r[k]) for k in ("swap/random/frozen", "ablation/random/frozen")]
            lines.append(f"| {x} | {r['latents per land'][0]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default=None, help="a folder written by tools.train_planted (default: shipped)"
    )
    parser.add_argument("--pairs", type=whole_number(1), default=2, help="swap partners per prompt")
    parser.add_argument(
        "--graphs", type=whole_number(1), default=None, help="at most this many graphs per mechanism"
    )
    parser.add_argument(
        "--figure", type=Path, default=Path("out/ground_truth_sweep.html"), help="sweep figure"
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the threshold sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, transcoders = planted.load_planted_world(data_dir=args.data)
    out = measure(model, transcoders, n_pairs=args.pairs, n_graphs=args.graphs, sweep=not args.no_sweep)
    print(table(out))
    if "sweep" in out:
        fig = sweep_figure(out["sweep"])
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.figure.with_name(f".{args.figure.name}.partial")
        fig.write_html(str(tmp), include_plotlyjs="cdn")
        tmp.replace(args.figure)
        print(f"\nthreshold sweep: {args.figure}")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return out


if __name__ == "__main__":
    main()
