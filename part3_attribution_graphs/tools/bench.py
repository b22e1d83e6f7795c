"""Speed benchmark: the seed's per-node loop, our `attribute`, and circuit-tracer, on one graph.

    python -m part3_attribution_graphs.tools.bench --case toy
    python -m part3_attribution_graphs.tools.bench --case cpu-large
    python -m part3_attribution_graphs.tools.bench --case gemma1b-shape --device cuda --dtype bfloat16
    python -m part3_attribution_graphs.tools.bench --case gemma270m
    python -m part3_attribution_graphs.tools.bench --case gemma270m-long --skip-seed-loop

All three methods run in one process on the same model, prompt and node set: every active latent at
positions from `--start-posn` on (our `top_k` is set above the transcoder width, and circuit-tracer's
`zero_positions` to the same prefix), the same three logit targets, one error node per (layer,
position) and one embedding node per position.

(a) the seed's loop (re-implemented here): per batch of 8 targets, a forward pass on 8 copies of the
    prompt and a backward pass, then a Python loop over every source node with scalar writes into A;
(b) our `attribute`: one backward pass per batch of targets (written out by `TransposedModel` where
    the architecture allows, else autograd), contracted with all sources at once; (b0), with
    `--autograd-row`, is the lesson's autograd engine `compute_adjacency_matrix`;
(c) circuit-tracer 0.5.0's `attribute` (TransformerLens backend), built from the same weights, at each
    of `--ct-batch-sizes`.

The worlds are random-weight Gemma 3 models built by `worlds.synthetic.make_world` (as the toy world
is): `toy` (the lesson's toy world), `cpu-large` (6 layers, d_model 256, 2k latents, 32-token prompt)
and `gemma1b-shape` (Gemma 3-1B's exact shape, 16k latents with L0 near 15, 30-token prompt; meant for
a GPU); and the real Gemma 3 270M (`gemma270m`, 23 tokens, every active latent; `gemma270m-long`, 118
tokens, latents capped). `--tiny` shrinks a random world to seconds on a CPU, to test the code path.
The output ends with the floor: the products the targets' backward passes cannot avoid, counted from
the model's shape, at the matrix-product rate measured in the same run, and the fraction of it (b) reaches.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import math
import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from ..attribution import (
    AttributionResult,
    Batch,
    _reading_targets,
    attribute,
    compute_adjacency_matrix,
    prepare_backward_batches,
    read_hook_name,
    write_hook_name,
)
from ..nodes import GraphNodes, NodeType
from ..replacement import FreezeHooks, TranscoderReplacementHooks
from ..transposed import TransposedModel
from ..worlds.gemma import format_prompt
from ..worlds.synthetic import WorldSpec, make_world
from ..worlds.toy import SPECIAL_TOKENS, make_toy_tokenizer, make_toy_world

__all__ = ["WorldSpec", "CASES", "make_world", "seed_compute_adjacency_matrix", "run_case", "main"]

GEMMA3_1B_ATTN = (["local"] * 5 + ["global"]) * 4 + ["local"] * 2  # 26 layers, 5 local : 1 global


CASES: dict[str, WorldSpec | None] = {
    "toy": None,  # `make_toy_world()` itself
    "cpu-large": WorldSpec(
        n_layers=6,
        d_model=256,
        n_heads=4,
        n_kv_heads=2,
        d_head=64,
        d_mlp=1024,
        d_sae=2048,
        target_l0=12,
        attn_types=("local", "local", "global") * 2,
        window_size=8,
        user="Write me a short rhyming couplet.",
        response="The sun descends, a golden hue,\nAs evening whispers, soft and true",
        n_tokens=32,
    ),
    "gemma1b-shape": WorldSpec(
        n_layers=26,
        d_model=1152,
        n_heads=4,
        n_kv_heads=1,
        d_head=256,
        d_mlp=6912,
        d_sae=16384,
        target_l0=15,
        attn_types=tuple(GEMMA3_1B_ATTN),
        window_size=512,
        d_vocab=262144,
        user="What is the capital of the state containing Dallas? Answer immediately.",
        response="The capital of the state containing Dallas is",
        n_tokens=30,
    ),
}
TOY_PROMPT = ("What is the opposite of small?", "The opposite of small is **large")
CT_DEFAULT_BATCH = 512  # circuit-tracer's default batch_size
# Real Gemma 3 270M (`load_gemma3_270m_offline`): 23 and 118 tokens with the chat template.
REAL_PROMPTS = {
    "gemma270m": ("What is the opposite of small?", "The opposite of small is large and"),
    "gemma270m-long": (
        "Read this note and answer in one word. The old lighthouse keeper walked down to the harbour every "
        "morning before sunrise. He counted the fishing boats, wrote their names in a small blue notebook, "
        "and checked the weather over the grey sea. In winter the wind was cold and the waves were high, "
        "so most boats stayed in the harbour, tied close together. In summer the water was calm and warm, "
        "and children swam near the rocks while their parents sold fish at the market. Which season had "
        "the calm water?",
        "The season with the calm water was",
    ),
}


def shrink(spec: WorldSpec) -> WorldSpec:
    """The same architecture and prompt at a size that builds and runs in seconds on a CPU."""
    attn = spec.attn_types[:3] if "global" in spec.attn_types[:3] else ("local", "local", "global")
    return replace(
        spec,
        n_layers=3,
        d_model=64,
        d_head=16,
        d_mlp=128,
        d_sae=min(spec.d_sae, 512),
        attn_types=attn,
        d_vocab=min(spec.d_vocab or 0, 4096) or None,
    )


# ---------------------------------------------------------------- (a) the seed's loop


def seed_setup_attribution(
    model: HookedSAETransformer,
    tokens: Int[Tensor, "1 seq"],
    freeze: FreezeHooks,
    reading: Float[Tensor, "batch d_model"],
    positions: Int[Tensor, " batch"],
    layers: list[int | str],
) -> dict[str, Tensor]:
    """The seed's batched backward: run `batch` copies of the prompt, target i reads copy i, backprop the sum.

    Differs from the seed in one way that only helps it: gradients are taken w.r.t. the write points
    alone (`autograd.grad`), not accumulated into every weight (`.backward()`).
    """
    batch, n_layers = reading.shape[0], model.cfg.n_layers
    writes = [write_hook_name("E")] + [write_hook_name(layer) for layer in range(n_layers)]
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    acts: dict[str, Tensor] = {}

    def leaf(x: Tensor, hook: HookPoint) -> Tensor:
        acts[hook.name] = x.detach().requires_grad_(True)
        return acts[hook.name]

    def keep(x: Tensor, hook: HookPoint) -> None:
        acts[hook.name] = x

    names = (set(writes[1:]) | {read_hook_name(layer) for layer in layers} | {last}) - {"unembed.hook_in"}
    hooks: list[tuple[str, Callable]] = [(writes[0], leaf)] + [(name, keep) for name in sorted(names)]
    with torch.enable_grad(), model.hooks(fwd_hooks=freeze.fwd_hooks + hooks):
        model(tokens.expand(batch, -1), return_type=None)
        if "L" in layers:  # logits read the final norm's output (scale frozen), which return_type=None skips
            acts["unembed.hook_in"] = model.ln_final(acts[last])
        terms = []
        for i in range(batch):
            value = acts[read_hook_name(layers[i])][i, positions[i]]
            terms.append((value * reading[i].to(value.dtype)).sum())
        grads = torch.autograd.grad(torch.stack(terms).sum(), [acts[w] for w in writes], allow_unused=True)
    return {w: torch.zeros_like(acts[w]) if g is None else g for w, g in zip(writes, grads)}


def seed_compute_adjacency_matrix(
    model: HookedSAETransformer,
    tokens: Int[Tensor, "1 seq"],
    graph: GraphNodes,
    freeze: FreezeHooks,
    tc_hooks: TranscoderReplacementHooks,
    batches: list[Batch],
    start_posn: int,
    only_batches: set[int] | None = None,
) -> Float[Tensor, "n_nodes n_nodes"]:
    """The seed's loop structure: per batch, install hooks, backward, then every source node one at a time.

    Args:
        only_batches: run just these batch indices (to time a sample of a long run).
    """
    n = len(graph.nodes)
    A = torch.zeros(n, n, dtype=graph.writing_vecs.dtype, device=graph.writing_vecs.device)
    for b_idx, (lo, nodes, reading, positions, layers) in enumerate(batches):
        if only_batches is not None and b_idx not in only_batches:
            continue
        tc_hooks.install()
        try:
            grads = seed_setup_attribution(model, tokens, freeze, reading, positions, layers)
        finally:
            tc_hooks.remove()
        for src in range(n):
            node = graph.nodes[src]
            if node.node_type == NodeType.LOGIT:
                continue
            grad_at_pos = grads[write_hook_name(node.layer)][: len(nodes), node.ctx_idx]  # (batch, d_model)
            edge = (grad_at_pos * graph.writing_vecs[src].unsqueeze(0)).sum(-1)
            if node.ctx_idx < start_posn:
                edge = torch.zeros_like(edge)
            for b in range(len(nodes)):
                A[lo + b, src] = edge[b]
    return A


# ---------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime peak is all we can get
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory above the level at entry: `torch.cuda.max_memory_allocated` on a GPU, sampled RSS on a
    CPU."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes() - self.base)

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:  # hand freed heap back to the OS, so earlier runs do not hide this one's growth
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            self.base = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes() - self.base)


def _timed(fn: Callable, device: str, repeats: int) -> tuple[float, float, int, object]:
    """Fastest wall time and CPU time of `repeats` runs (after a warm-up run when repeats > 1), peak memory,
    last result. CPU time (all threads of this process) is steadier than wall time on a shared machine."""
    if repeats > 1:
        fn()
    best, best_cpu, peak, out = math.inf, math.inf, 0, None
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            _sync(device)
            best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
        peak = max(peak, mem.peak)
    return best, best_cpu, peak, out


# ---------------------------------------------------------------- the benchmark


@dataclass
class Row:
    method: str
    seconds: float
    cpu_seconds: float
    passes: str
    peak_mib: float
    n_nodes: int
    note: str = ""

    def __post_init__(
        self,
    ) -> None:  # one line per row as it is measured: a long case's table comes only at the end
        print(f"measured {self.method}: {self.seconds:.2f} s, {self.cpu_seconds:.2f} CPU s", flush=True)


def floor_flops(model: HookedSAETransformer, graph: GraphNodes) -> float:
    """Multiply-adds x 2 that the targets' backward passes cannot avoid, from the model's shape.

    A target at position p reading layer l needs its gradient at positions 0..p through layer l's
    attention and layers 0..l-1 in full (a logit: every layer): per position and layer, the products
    with W_O, W_V (per key-value head) and W_skip. Pattern mixing and the contraction with the
    sources are left out, so the floor is a little low.
    """
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    attn = cfg.d_model * cfg.d_head * (cfg.n_heads + n_kv)
    layer = attn + cfg.d_model * cfg.d_model
    total = 0.0
    for node, reads in zip(graph.nodes, graph.reading_vecs.ne(0).any(-1).tolist()):
        if not reads:
            continue
        per_position = cfg.n_layers * layer if node.layer == "L" else node.layer * layer + attn
        total += 2.0 * per_position * (node.ctx_idx + 1)
    return total


def matmul_rate(model: HookedSAETransformer, device: str, seconds: float = 2.0) -> float:
    """FLOP/s of this machine on the backward's typical product, (256 * 16 rows, d_model) @ (d_model,
    d_model)."""
    d = model.cfg.d_model
    dtype = next(model.parameters()).dtype
    x = torch.randn(256 * 16, d, device=device, dtype=dtype)
    w = torch.randn(d, d, device=device, dtype=dtype)
    x @ w
    n, t0 = 0, time.perf_counter()
    _sync(device)
    while time.perf_counter() - t0 < seconds:
        x @ w
        n += 1
    _sync(device)
    return n * 2.0 * x.shape[0] * d * d / (time.perf_counter() - t0)


def _build(case: str, device: str, dtype: torch.dtype, tiny: bool) -> tuple:
    """(model, transcoders, prompt, spec or None, d_sae) for a case."""
    if case in REAL_PROMPTS:
        from ..worlds.gemma270m import load_gemma3_270m_offline

        model, transcoders = load_gemma3_270m_offline(device=device, dtype=dtype)
        return model, transcoders, format_prompt(*REAL_PROMPTS[case]), None, transcoders[0].cfg.d_sae
    spec = CASES[case]
    if spec is None:
        model, transcoders = make_toy_world(0, dtype=torch.float32)
        if device != "cpu":
            model, transcoders = model.to(device), {k: v.to(device) for k, v in transcoders.items()}
        if dtype != torch.float32:
            model, transcoders = model.to(dtype), {k: v.to(dtype) for k, v in transcoders.items()}
            model.cfg.dtype = dtype
        return model, transcoders, format_prompt(*TOY_PROMPT), None, transcoders[0].cfg.d_sae
    spec = shrink(spec) if tiny else spec
    model, transcoders = make_world(
        spec, make_toy_tokenizer(), len(SPECIAL_TOKENS), dtype=dtype, device=device
    )
    prompt = format_prompt(spec.user, spec.response)
    if model.to_tokens(prompt).shape[1] != spec.n_tokens:
        raise RuntimeError(
            f"The {case} prompt has {model.to_tokens(prompt).shape[1]} tokens, expected {spec.n_tokens}."
        )
    return model, transcoders, prompt, spec, spec.d_sae


def run_case(
    case: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
    ct_batch_sizes: tuple[int, ...] = (512,),
    start_posn: int = 4,
    repeats: int = 3,
    skip_seed_loop: bool = False,
    skip_circuit_tracer: bool = False,
    seed_max_batches: int | None = None,
    tiny: bool = False,
    max_feature_nodes: int | None = None,
    autograd_row: bool = False,
) -> dict:
    """Build the case's world, time (a), (b), (c) on one prompt and node set; return rows and ratios.

    (c) runs once per batch size in `ct_batch_sizes`; the ratios use its fastest. With
    `max_feature_nodes` both engines cap their latents, each by its own influence estimate, so the
    node sets differ and (a) is skipped.
    """
    batch_size = batch_size or inspect.signature(attribute).parameters["batch_size"].default
    t0 = time.perf_counter()
    model, transcoders, prompt, spec, d_sae = _build(case, device, dtype, tiny)
    build_s = time.perf_counter() - t0
    tokens = model.to_tokens(prompt)
    every_latent = d_sae + 1
    rows: list[Row] = []

    # (b) ours
    def ours() -> AttributionResult:
        return attribute(
            model,
            transcoders,
            prompt,
            start_posn=start_posn,
            top_k=every_latent,
            batch_size=batch_size,
            max_feature_nodes=max_feature_nodes,
        )

    b_s, b_cpu, b_mem, result = _timed(ours, device, repeats)
    graph = result.graph
    batches = prepare_backward_batches(graph, batch_size)
    n_targets = len(_reading_targets(graph, batches))
    engine = "written-out backward" if TransposedModel.supports(model, _frozen(model, tokens)) else "autograd"
    rows.append(
        Row(
            "(b) ours: attribute",
            b_s,
            b_cpu,
            f"{n_targets} bwd ({engine})",
            b_mem / 2**20,
            len(graph),
            f"batch_size={batch_size}"
            + (f", max_feature_nodes={max_feature_nodes}" if max_feature_nodes is not None else ""),
        )
    )
    n_latents = sum(n.node_type == NodeType.LATENT for n in graph.nodes)
    token_ids = [n.feature for n in graph.nodes if n.node_type == NodeType.LOGIT]
    flops = floor_flops(model, graph)
    rate = matmul_rate(model, device)
    out: dict = dict(
        case=case + (" (tiny)" if tiny else ""),
        device=device,
        dtype=str(dtype).replace("torch.", ""),
        n_tokens=tokens.shape[1],
        n_latents=n_latents,
        build_seconds=build_s,
        spec=asdict(spec) if spec is not None else case,
        floor_tflop=flops / 1e12,
        matmul_gflops=rate / 1e9,
        floor_seconds=flops / rate,
        floor_fraction=flops / rate / b_s,
    )
    extra_rows = []

    def rest_of_attribute(A: Tensor) -> tuple[float, float]:  # everything but the adjacency, around a given A
        from .. import attribution as engine

        saved = engine.compute_adjacency_matrix, engine.transposed_adjacency_matrix
        engine.compute_adjacency_matrix = engine.transposed_adjacency_matrix = lambda *args, **kwargs: A
        try:
            s, c, _, _ = _timed(
                lambda: attribute(model, transcoders, prompt, start_posn=start_posn, top_k=every_latent),
                device,
                1,
            )
        finally:
            engine.compute_adjacency_matrix, engine.transposed_adjacency_matrix = saved
        return s, c

    # (c) circuit-tracer, at each batch size
    if not skip_circuit_tracer:
        from .crosscheck import aligned_adjacency, ct_attribute, ct_replacement_model

        ct_model = ct_replacement_model(model, transcoders, start_posn=start_posn)
        ct_rows = []
        for ct_batch_size in ct_batch_sizes:
            c_s, c_cpu, c_mem, ct_graph = _timed(
                lambda bs=ct_batch_size: ct_attribute(ct_model, tokens, token_ids, bs, max_feature_nodes),
                device,
                repeats,
            )
            n_feat = len(ct_graph.selected_features)
            passes = math.ceil(len(token_ids) / ct_batch_size) + math.ceil(n_feat / ct_batch_size)
            if max_feature_nodes is None:
                ours_A, theirs_A, keys = aligned_adjacency(result, ct_graph)
                diff = (
                    (ours_A.double() - theirs_A.double()).abs().max() / theirs_A.double().abs().max()
                ).item()
                out["ct_vs_ours_max_rel_diff"] = diff
                same = f"same edges as (b) to {diff:.1e} (max rel.)"
            else:
                same = "its own choice of latents"
            ct_rows.append(
                Row(
                    f"(c) circuit-tracer attribute, batch_size={ct_batch_size}",
                    c_s,
                    c_cpu,
                    f"1 fwd on {ct_batch_size} copies + {passes} bwd",
                    c_mem / 2**20,
                    ct_graph.adjacency_matrix.shape[0],
                    f"{n_feat} latents; {same}",
                )
            )
            del ct_graph
        best = min(ct_rows, key=lambda r: r.seconds)
        best.note = "fastest of the sweep; " + best.note
        rows += ct_rows
        out["c_best_over_b"] = best.seconds / b_s
        out["c_best_over_b_cpu"] = best.cpu_seconds / b_cpu
        default = [r for r, bs in zip(ct_rows, ct_batch_sizes) if bs == CT_DEFAULT_BATCH]
        out["c_default_over_b"] = default[0].seconds / b_s if default else None
        del ct_model

    # (b0) ours before the written-out backward: the lesson's compute_adjacency_matrix (autograd, vmap)
    if autograd_row:
        freeze = FreezeHooks(model)
        tc_hooks = TranscoderReplacementHooks(model, transcoders, freeze.cache_frozen_values(tokens))
        g_s, g_cpu, g_mem, A_grad = _timed(
            lambda: compute_adjacency_matrix(model, tokens, graph, freeze, tc_hooks, batches, start_posn),
            device,
            1,
        )
        rest_s, rest_cpu = rest_of_attribute(A_grad)
        A = result.adjacency_matrix.double()
        diff = (A_grad.double() - A).abs().max().item() / A.abs().max().item()
        extra_rows.append(
            Row(
                "(b0) ours, autograd engine",
                g_s + rest_s,
                g_cpu + rest_cpu,
                f"1 fwd + {n_targets} bwd (vmap)",
                g_mem / 2**20,
                len(graph),
                f"compute_adjacency_matrix, as in the lesson; same A as (b) to {diff:.1e}",
            )
        )
        del A_grad

    # (a) the seed's loop, on the same graph
    if not skip_seed_loop and max_feature_nodes is None:
        seed_batches = prepare_backward_batches(graph, 8)
        if seed_max_batches is None and case in ("gemma1b-shape", "gemma270m") and not tiny:
            seed_max_batches = (
                40 if case == "gemma1b-shape" else 12
            )  # the whole loop would take about an hour
        only = None
        if seed_max_batches is not None and seed_max_batches < len(seed_batches):
            step = len(seed_batches) / seed_max_batches  # spread over all layers: deeper targets cost more
            only = {int(i * step) for i in range(seed_max_batches)}
        freeze = FreezeHooks(model)
        cache = freeze.cache_frozen_values(tokens)
        tc_hooks = TranscoderReplacementHooks(model, transcoders, cache)

        def seed() -> Tensor:
            return seed_compute_adjacency_matrix(
                model, tokens, graph, freeze, tc_hooks, seed_batches, start_posn, only
            )

        loop_s, loop_cpu, a_mem, A_seed = _timed(seed, device, 1)
        rest_s, rest_cpu = rest_of_attribute(A_seed)
        note = ""
        if only is not None:
            loop_s, loop_cpu = (
                loop_s * len(seed_batches) / len(only),
                loop_cpu * len(seed_batches) / len(only),
            )
            note = f"loop extrapolated from {len(only)} of {len(seed_batches)} batches"
        else:
            A = result.adjacency_matrix.double()
            diff = (A_seed.double() - A).abs().max().item() / A.abs().max().item()
            note = f"same A as (b) to {diff:.1e} (max rel.)"
            out["seed_vs_ours_max_rel_diff"] = diff
        rows.insert(
            0,
            Row(
                "(a) seed's per-node loop",
                loop_s + rest_s,
                loop_cpu + rest_cpu,
                f"{len(seed_batches)} x (fwd on 8 copies + bwd)",
                a_mem / 2**20,
                len(graph),
                note,
            ),
        )
        del A_seed

    if not tiny and spec is not None or case == "toy":
        lesson_s, lesson_cpu, lesson_mem, lesson = _timed(
            lambda: attribute(model, transcoders, prompt, start_posn=start_posn, batch_size=batch_size),
            device,
            repeats,
        )
        n_lesson = len(_reading_targets(lesson.graph, prepare_backward_batches(lesson.graph, batch_size)))
        extra_rows.append(
            Row(
                "(b') ours, lesson default top_k=5",
                lesson_s,
                lesson_cpu,
                f"{n_lesson} bwd",
                lesson_mem / 2**20,
                len(lesson.graph),
                "fewer nodes: for reference, not in the ratios",
            )
        )
    rows += extra_rows
    out["rows"] = [asdict(r) for r in rows]
    seed_rows = [r for r in rows if r.method.startswith("(a)")]
    out["a_over_b"] = seed_rows[0].seconds / b_s if seed_rows else None
    out["a_over_b_cpu"] = seed_rows[0].cpu_seconds / b_cpu if seed_rows else None
    return out


def _frozen(model: HookedSAETransformer, tokens: Tensor) -> FreezeHooks:
    freeze = FreezeHooks(model)
    freeze.cache_frozen_values(tokens)
    return freeze


def format_table(res: dict) -> str:
    """A markdown table of one case's results."""
    threads = f", {res['threads']} CPU threads" if "threads" in res else ""
    lines = [
        f"### {res['case']}: {res['device']}, {res['dtype']}, {res['n_tokens']} tokens, "
        f"{res['n_latents']} latents in the graph{threads}",
        "",
        "| method | s / graph | CPU s | passes | peak memory (MiB) | nodes | note |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | {r['passes']} "
            f"| {r['peak_mib']:.0f} | {r['n_nodes']} | {r['note']} |"
        )
    ratios = []
    if res.get("a_over_b") is not None:
        ratios.append(f"a/b = {res['a_over_b']:.1f}x (wall), {res['a_over_b_cpu']:.1f}x (CPU time)")
    if res.get("c_best_over_b") is not None:
        ratios.append(
            f"c(best)/b = {res['c_best_over_b']:.2f}x (wall), {res['c_best_over_b_cpu']:.2f}x (CPU time)"
        )
    if res.get("c_default_over_b") is not None:
        ratios.append(f"c(default batch {CT_DEFAULT_BATCH})/b = {res['c_default_over_b']:.2f}x")
    lines += ["", ", ".join(ratios)] if ratios else []
    lines += [
        "",
        f"Floor (model shape, products the targets' backward passes cannot avoid): "
        f"{res['floor_tflop']:.2f} TFLOP at {res['matmul_gflops']:.0f} GFLOP/s measured here = "
        f"{res['floor_seconds']:.1f} s; (b) runs at {res['floor_fraction']:.0%} of that floor.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=[*CASES, *REAL_PROMPTS], default="toy")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    parser.add_argument("--batch-size", type=int, default=None, help="ours (default: attribute's default)")
    parser.add_argument(
        "--ct-batch-sizes",
        default=None,
        help=f"circuit-tracer's, comma-separated; the fastest counts (default: its own, "
        f"{CT_DEFAULT_BATCH}; for gemma270m: 32,64,128,{CT_DEFAULT_BATCH})",
    )
    parser.add_argument("--start-posn", type=int, default=4)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs of (b) and (c); the fastest counts (default 3, 1 for gemma270m*)",
    )
    parser.add_argument("--skip-seed-loop", action="store_true")
    parser.add_argument("--skip-circuit-tracer", action="store_true")
    parser.add_argument(
        "--autograd-row",
        action="store_true",
        help="also time our autograd engine (compute_adjacency_matrix), the one the lesson builds "
        "(default for gemma270m)",
    )
    parser.add_argument(
        "--max-feature-nodes",
        type=int,
        default=None,
        help="cap the latents (both engines; default: none, 4096 for gemma270m-long)",
    )
    parser.add_argument(
        "--seed-max-batches",
        type=int,
        default=None,
        help="time only this many of the seed loop's batches (spread evenly) and extrapolate "
        "(default: all, but 40 for gemma1b-shape, 12 for gemma270m)",
    )
    parser.add_argument("--tiny", action="store_true", help="shrink the case to a CPU-sized smoke test")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible to torch.")
    real = args.case in REAL_PROMPTS
    if args.ct_batch_sizes:
        ct_sizes = tuple(int(v) for v in args.ct_batch_sizes.split(","))
    else:
        ct_sizes = (32, 64, 128, CT_DEFAULT_BATCH) if args.case == "gemma270m" else (CT_DEFAULT_BATCH,)
    cap = args.max_feature_nodes
    if cap is None and args.case == "gemma270m-long":
        cap = 4096
    res = run_case(
        args.case,
        args.device,
        getattr(torch, args.dtype),
        args.batch_size,
        ct_sizes,
        args.start_posn,
        args.repeats or (1 if real else 3),
        args.skip_seed_loop,
        args.skip_circuit_tracer,
        args.seed_max_batches,
        args.tiny,
        cap,
        args.autograd_row or args.case == "gemma270m",
    )
    res["threads"] = torch.get_num_threads()
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return res


if __name__ == "__main__":
    main()
