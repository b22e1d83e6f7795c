"""build_intermediate_nodes: top-k latents and one error node per (layer, position)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..nodes import (
    build_intermediate_nodes,
)
from ..worlds.gemma import START_POSN
from .compare import (
    _close,
    _diagnose,
    _float,
    _int,
    _items,
    _list,
    _node_attr,
    _node_number,
    _ntype,
    _stack,
    _worst,
)
from .messages import _Fail
from .running import _public_test, _run
from .worlds import _World


def _silent_layer(transcoders: dict, layer: int) -> dict:
    """The same transcoders, except that in `layer` no latent can fire (threshold out of reach)."""
    silent = copy.deepcopy(transcoders[layer])
    with torch.no_grad():
        silent.threshold.fill_(1e9)
    return {**transcoders, layer: silent}


def _intermediate_case(
    fn: Callable, w: _World, transcoders: dict, start_posn: int, top_k: int, label: str
) -> None:
    cache, tokens, d_model = w.cache, w.tokens, w.model.cfg.d_model
    seq = tokens.shape[1]
    tc_hooks = w.tc_hooks(transcoders)
    exp_nodes, _, _, exp_ranges = build_intermediate_nodes(
        transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k
    )
    out = _run(
        fn,
        transcoders,
        cache,
        tc_hooks,
        tokens,
        d_model,
        start_posn,
        top_k,
        what="build_intermediate_nodes",
        hints=[
            (
                IndexError,
                "",
                "check orientations: W_enc is (d_model, d_sae), so latent f reads W_enc[:, f] "
                "(= W_enc.T[f]); W_dec is (d_sae, d_model), so it writes a * W_dec[f]",
            ),
            (RuntimeError, "size", "check orientations: latent f reads W_enc[:, f] and writes a * W_dec[f]"),
        ],
    )
    nodes, writing, reading, ranges = _items(out, 4, "build_intermediate_nodes")
    nodes = _list(nodes, f"nodes{label}")
    writing = _list(writing, f"writing_vecs{label}", len(nodes))
    reading = _list(reading, f"reading_vecs{label}", len(nodes))
    for i, v in enumerate(reading):
        if isinstance(v, Tensor) and v.shape != (d_model,):
            raise _Fail(
                f"reading_vecs[{i}]{label} has shape {tuple(v.shape)}, expected ({d_model},): the encoder "
                "direction of latent f is the column W_enc[:, f] (W_enc is (d_model, d_sae))."
            )
    for i, v in enumerate(writing):
        if isinstance(v, Tensor) and v.shape != (d_model,):
            raise _Fail(
                f"writing_vecs[{i}]{label} has shape {tuple(v.shape)}, expected ({d_model},): latent f "
                "writes a * W_dec[f] (W_dec is (d_sae, d_model))."
            )
    W = _stack(writing, f"writing_vecs{label}", d_model, w.device)
    R = _stack(reading, f"reading_vecs{label}", d_model, w.device)

    # node_range_dict: one contiguous (start, end) block per layer, covering the lists in layer order.
    layers = sorted(transcoders)
    if not isinstance(ranges, dict) or sorted(ranges, key=str) != sorted(exp_ranges, key=str):
        got = sorted(ranges, key=str) if isinstance(ranges, dict) else type(ranges).__name__
        raise _Fail(
            f"node_range_dict{label} should map each layer index {layers} to its (start, end) slice of the "
            f"returned lists, got keys {got}."
        )
    expected_start = 0
    for layer in layers:
        start, end = (_int(v, f"node_range_dict[{layer}]") for v in ranges[layer])
        if start != expected_start or end < start:
            raise _Fail(
                f"node_range_dict[{layer}] = {ranges[layer]}{label}: the layers' ranges should follow each "
                f"other with no gaps, so layer {layer} should start at {expected_start}."
            )
        wrong = [i for i in range(start, min(end, len(nodes))) if getattr(nodes[i], "layer", None) != layer]
        if wrong:
            raise _Fail(
                f"node_range_dict[{layer}] = {ranges[layer]}{label}, but node {wrong[0]} in that range has "
                f"layer {getattr(nodes[wrong[0]], 'layer', None)!r}."
            )
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
        elif positions in (
            list(range(start_posn + 1, seq)),
            list(range(start_posn - 1, seq)),
            list(range(start_posn, seq - 1)),
        ):
            hint = "off by one"
        else:
            hint = "check your position loop"
        raise _Fail(
            f"Intermediate nodes{label} should cover positions start_posn..seq_len-1 = "
            f"{start_posn}..{seq - 1}; yours cover {span} ({hint})."
        )

    # Match nodes to the reference by (layer, position, latent) - order within a layer is free.
    def key(n: Any) -> tuple:
        kind = _ntype(n)
        if kind not in ("latent", "mlp_error"):
            raise _Fail(
                "Intermediate nodes should be LATENT or MLP_ERROR nodes; found node_type "
                f"{_node_attr(n, 'node_type', 'Each node')!r}."
            )
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
            raise _Fail(
                f"Layer {k[0]}, position {k[1]}{label} has more than one {what}: one error node per (layer, "
                "position), and each latent at most once."
            )
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
                raise _Fail(
                    f"There is no MLP_ERROR node at layer {layer}, position {pos}{label}: add one error node "
                    "per (layer, position), after that position's latents."
                )
            got_f = got_latents.get((layer, pos), set())
            exp_f = exp_latents.get((layer, pos), [])
            if got_f == set(exp_f):
                continue
            a = acts[layer][0, pos]
            valid = [f for f in got_f if isinstance(f, int) and 0 <= f < a.shape[0]]
            if len(valid) == len(got_f) == len(exp_f) and torch.equal(
                a[valid].sort().values, a[exp_f].sort().values
            ):
                continue  # a different pick among exactly tied activations is just as right
            extra = got_f - set(exp_f)
            if extra and len(valid) == len(got_f) and all(a[f] <= 0 for f in extra):
                raise _Fail(
                    f"You kept latents with zero activation (layer {layer}, position {pos}{label}: latents "
                    f"{sorted(extra)[:5]}): keep the top_k latents with activation > 0, fewer if fewer fire."
                )
            firing = int((a > 0).sum())
            raise _Fail(
                f"At layer {layer}, position {pos}{label} you kept latents {sorted(got_f)}, expected the "
                f"top_k={top_k} most active (of {firing} that fire): {exp_f}."
            )

    # The expected vectors, from the definitions, for the latents you kept (the reference's, up to ties).
    lat = sorted(k for k in mine if k[2] == "latent")
    errs = sorted(k for k in mine if k[2] == "mlp_error")
    act_of = {k: acts[k[0]][0, k[1], k[3]].double() for k in lat}

    def b_dec_of(keys: list) -> Tensor:
        return torch.stack([transcoders[k[0]].b_dec.detach().double() for k in keys])

    def dec_row(layer: int, f: int) -> Tensor:  # one row at a time: a real model's W_dec is large
        return transcoders[layer].W_dec[f].detach().double()

    if lat:
        i_mine = [mine[k] for k in lat]
        got_a = torch.tensor(
            [_float(nodes[i].activation, "Each latent's activation") for i in i_mine], dtype=torch.float64
        )
        exp_a = torch.stack([act_of[k] for k in lat]).cpu()
        if not _close(got_a, exp_a, max(w.tol, 1e-6)):
            seq_len = acts[lat[0][0]].shape[1]
            shifted = [
                torch.stack(
                    [acts[k[0]][0, min(max(k[1] + d, 0), seq_len - 1), k[3]].double() for k in lat]
                ).cpu()
                for d in (-1, 1)
            ]
            if any(_close(got_a, other, max(w.tol, 1e-6)) for other in shifted):
                raise _Fail(
                    f"Latent activations{label} are read at the neighbouring position (off by one?): a "
                    "latent node at position pos has activation transcoder_acts[layer][0, pos, f]."
                )
            raise _Fail(
                f"Latent activations{label} should be transcoder_acts[layer][0, pos, f], "
                f"{_worst(got_a, exp_a, 'activation')}."
            )
        enc = torch.stack([transcoders[k[0]].W_enc[:, k[3]].detach().double() for k in lat])
        dec = torch.stack([dec_row(k[0], k[3]) for k in lat])
        a_col = exp_a.to(dec.device).unsqueeze(-1)
        got_w, exp_wl = W[i_mine], a_col * dec
        if not _close(got_w, exp_wl, w.tol):
            hint = _diagnose(
                got_w,
                [
                    (
                        "your latent writing vectors are not scaled by the activation: write a * W_dec[f]",
                        lambda: dec,
                    ),
                    (
                        "your latent writing vectors use the encoder; a latent writes its decoder row, a * "
                        "W_dec[f]",
                        lambda: a_col * enc,
                    ),
                    (
                        "you added b_dec to each latent's writing vector; a latent writes a * W_dec[f] only "
                        "(b_dec is a constant, part of no latent: it is subtracted from the error node)",
                        lambda: a_col * dec + b_dec_of(lat),
                    ),
                    (
                        "your latent writing vectors are scaled to unit length; write a * W_dec[f] as it is",
                        lambda: (a_col * dec) / (a_col * dec).norm(dim=-1, keepdim=True),
                    ),
                ],
                w.tol,
            )
            raise _Fail(
                hint or f"Latent writing vectors{label} should be a * W_dec[f], {_worst(got_w, exp_wl)}."
            )
        got_r = R[i_mine]
        if not _close(got_r, enc, w.tol):
            hint = _diagnose(
                got_r,
                [
                    (
                        "your latent reading vectors use the decoder; a latent reads its encoder direction "
                        "W_enc[:, f]",
                        lambda: dec,
                    ),
                    (
                        "your latent reading vectors are scaled by the activation; read the plain encoder "
                        "direction W_enc[:, f]",
                        lambda: a_col * enc,
                    ),
                    (
                        "your latent reading vectors come from the next layer's transcoder; read "
                        "transcoders[layer].W_enc[:, f], the node's own layer",
                        lambda: (
                            torch.stack(
                                [
                                    transcoders[layers[(layers.index(k[0]) + 1) % len(layers)]].W_enc[:, k[3]]
                                    for k in lat
                                ]
                            )
                            .detach()
                            .double()
                        ),
                    ),
                    (
                        "your latent reading vectors come from the previous layer's transcoder; read "
                        "transcoders[layer].W_enc[:, f], the node's own layer",
                        lambda: (
                            torch.stack(
                                [transcoders[layers[layers.index(k[0]) - 1]].W_enc[:, k[3]] for k in lat]
                            )
                            .detach()
                            .double()
                        ),
                    ),
                    (
                        "your latent reading vectors are scaled to unit length; read the plain encoder "
                        "direction W_enc[:, f] (the transcoder's pre-activation is x @ W_enc[:, f])",
                        lambda: enc / enc.norm(dim=-1, keepdim=True),
                    ),
                ],
                w.tol,
            )
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
    mlp_in = per_error(lambda lt, p: cache[transcoders[lt].cfg.metadata.hook_name][0, p])
    if not _close(got_e, exp_e, w.tol):
        dec = per_error(lambda lt, p: tc_hooks.transcoder_output[lt][0, p])
        hint = _diagnose(
            got_e,
            [
                (
                    "your error node is mlp_out - transcoder_output (= mlp_out - decode(acts)): that leaves "
                    "the skip term in the error although the linear skip path already carries it, so it is "
                    "counted twice, and it drops the latents outside the top_k. Use mlp_out - (kept "
                    "latents' a * W_dec + b_dec + tc_hooks.skip_output[layer])",
                    lambda: mlp - dec,
                ),
                (
                    "your error node subtracts every active latent (decode(acts)); subtract only the "
                    "latents kept as nodes, so the others are folded into the error",
                    lambda: mlp - dec - skip,
                ),
                (
                    "your error node forgets the skip term: subtract tc_hooks.skip_output[layer] too (the "
                    "linear skip path already carries it)",
                    lambda: mlp - kept - b_dec,
                ),
                ("your error node forgets b_dec: subtract the decoder bias too", lambda: mlp - kept - skip),
                (
                    "your error node forgets b_dec and the skip term: error = mlp_out - (kept latents + "
                    "b_dec + skip)",
                    lambda: mlp - kept,
                ),
                (
                    "your error node is the whole MLP output: subtract the kept latents, b_dec and the skip "
                    "term",
                    lambda: mlp,
                ),
                (
                    "your error node has the wrong sign: error = mlp_out - (kept latents + b_dec + skip), "
                    "what the MLP writes that the kept latents, b_dec and the skip do not",
                    lambda: -exp_e,
                ),
                (
                    "your error node starts from the MLP's input (hook_name); start from its output: "
                    "cache[tc.cfg.metadata.hook_name_out][0, pos] - (kept latents + b_dec + skip)",
                    lambda: mlp_in - kept - b_dec - skip,
                ),
                (
                    "your error node subtracts b_dec twice: error = mlp_out - (kept latents' a * W_dec + "
                    "b_dec + skip)",
                    lambda: exp_e - b_dec,
                ),
            ],
            w.tol,
        )
        raise _Fail(
            hint
            or f"MLP error writing vectors{label} should be mlp_out - (kept latents' a * W_dec + b_dec + "
            f"skip), {_worst(got_e, exp_e, 'error')}."
        )
    if R[i_mine].abs().max() > 0:
        raise _Fail("MLP error nodes read nothing: their reading vectors should be zeros.")


@_public_test("build_intermediate_nodes")
def test_build_intermediate_nodes(fn: Callable, w: _World) -> None:
    """Top-k latents (a > 0) and one error node per (layer, position), with their vectors."""
    _intermediate_case(fn, w, w.transcoders, w.start_posn, w.top_k, "")
    _intermediate_case(fn, w, w.transcoders, w.start_posn + 2, 40, " (start_posn=6, top_k=40)")
    if w.toy:  # a copy of one transcoder: cheap here, a few hundred MB on a real model
        _intermediate_case(
            fn, w, _silent_layer(w.transcoders, 1), w.start_posn, 3, " (no latent fires in layer 1, top_k=3)"
        )
