"""The real world: Gemma 3-1B IT with the GemmaScope 2 transcoders, loaded from the Hugging Face hub.

Gemma is gated, so loading needs a Hugging Face token (`HF_TOKEN` in a `.env` file, see
`.env.example`). Without a token or without network, every loader here raises an error that says
so and names the offline worlds (see `worlds.hub`).
"""

from __future__ import annotations

import functools
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, HookedSAETransformer

from .hub import (
    OFFLINE_HINT,
    HubRequestError,
    HubUnreachableError,
    MissingTokenError,
    check_hub,
    hub_download,
    hub_error,
    load_hf_token,
    resolve_revision,
    transport_errors,
    use_token,
)

__all__ = [
    "format_prompt",
    "START_POSN",
    "GEMMA_MODEL",
    "TRANSCODER_RELEASE",
    "transcoder_ids",
    "MissingTokenError",
    "HubUnreachableError",
    "load_hf_token",
    "load_gemma_model",
    "load_saes_parallel",
    "load_gemma_world",
    "gemmascope_transcoder_loader",
]

GEMMA_MODEL = "google/gemma-3-1b-it"
TRANSCODER_RELEASE = "gemma-scope-2-1b-it-transcoders-all"
START_POSN = 4  # <bos>, <start_of_turn>, "user", "\n": chat-template tokens that carry no attribution signal


def format_prompt(user_prompt: str, model_response: str = "") -> str:
    """Wrap a user turn and the start of the model's answer in Gemma's chat template.

    The tokenizer adds `<bos>` itself, so the tokens start `<bos> <start_of_turn> user \\n ...`.
    """
    return f"<start_of_turn>user\n{user_prompt}<end_of_turn>\n<start_of_turn>model\n{model_response}"


def transcoder_ids(
    n_layers: int = 26, width: str = "16k", l0: str = "small", affine: bool = True
) -> list[str]:
    """GemmaScope 2 transcoder ids, e.g. `layer_3_width_16k_l0_small_affine`."""
    return [f"layer_{layer}_width_{width}_l0_{l0}{'_affine' if affine else ''}" for layer in range(n_layers)]


def _hub_error(what: str, err: Exception, gated: str | None = GEMMA_MODEL) -> HubUnreachableError:
    access = f"your HF_TOKEN needs access to {gated}" if gated else "a gated repository needs your HF_TOKEN"
    return hub_error(what, err, f"({access}.) {OFFLINE_HINT}")


def gemmascope_transcoder_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
    revision: str | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """A SAELens converter (`SAE.from_pretrained(..., converter=...)`) for GemmaScope 2's transcoders.

    It gives the config and weights SAELens' own `gemma_3` loader gives (`tests/test_loading.py` compares
    them), but makes its two downloads (`config.json`, `params.safetensors`) through `worlds.hub.hub_download`
    (rate limits and server errors retried, a stale token dropped, huggingface_hub's cache and
    `HF_HUB_OFFLINE` honoured, a wall-clock deadline), at `revision` (a commit sha: `load_saes_parallel`
    passes the one it resolved, so every layer comes from one commit), and reads the tensor shapes from the
    downloaded file. SAELens' loader also reads them with its own HTTP range requests, which ignore
    `HF_HUB_OFFLINE`, so it cannot load from a warm cache offline.
    """
    from safetensors.torch import load_file

    token = None  # hub_download sends the implicit token (find_hf_token) unless switched off
    pinned = {"revision": revision, "force_download": force_download}
    try:
        raw = json.loads(
            Path(hub_download(repo_id, f"{folder_name}/config.json", token, **pinned)).read_text()
        )
    except HubRequestError as err:  # an old layout without config.json: what the folder name says
        if err.kind != "not found":
            raise
        raw = {
            "model_name": repo_id.replace("gemma-scope-2", "gemma-3"),
            "affine_connection": "affine" in folder_name,
        }
    params = load_file(hub_download(repo_id, f"{folder_name}/params.safetensors", token, **pinned), device)
    layer = int(re.search(r"layer_(\d+)", folder_name).group(1))
    d_in, d_sae = params["w_enc"].shape
    affine = bool(raw.get("affine_connection", False))
    model_name = str(raw.get("model_name", ""))
    model_name = (model_name if "google" in model_name else f"google/{model_name}").replace("-v3", "-3")
    if "270m" in model_name:  # the hub names the 270M model without "-pt"
        model_name = model_name.replace("-pt", "")
    cfg = {
        "architecture": "jumprelu_skip_transcoder" if affine else "jumprelu_transcoder",
        "d_in": d_in,
        "d_sae": d_sae,
        "d_out": params["w_dec"].shape[-1],
        "dtype": "float32",
        "model_name": model_name,
        "hook_name": f"blocks.{layer}.hook_mlp_in",  # SAELens' name; load_saes_parallel corrects it
        "hook_name_out": f"blocks.{layer}.hook_mlp_out",
        "hook_head_index": None,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
        "context_size": 1024,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "hf_hook_name": raw.get("hf_hook_point_in"),
        "hf_hook_name_out": raw.get("hf_hook_point_out"),
        "device": device,
        **(cfg_overrides or {}),
    }
    state = {
        "W_enc": params["w_enc"],
        "W_dec": params["w_dec"],
        "b_enc": params["b_enc"],
        "b_dec": params["b_dec"],
        "threshold": params["threshold"],
    }
    if "affine_skip_connection" in params:  # the hub keeps (d_in, d_out); SAELens' W_skip is (d_out, d_in)
        state["W_skip"] = params["affine_skip_connection"].T.contiguous()
    return cfg, state, None


def load_gemma_model(
    device: str = "cpu", dtype: torch.dtype = torch.float32, token: str | None = None
) -> HookedSAETransformer:
    """Gemma 3-1B IT as a `HookedSAETransformer`, unprocessed (no folded norms, no centring)."""
    use_token(token or load_hf_token())
    try:
        model = HookedSAETransformer.from_pretrained_no_processing(GEMMA_MODEL, device=device, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:  # transformers: network, auth, files; Xet: the rest
        raise _hub_error(GEMMA_MODEL, err) from err
    model.set_use_hook_mlp_in(True)
    return model


def load_saes_parallel(
    release: str,
    sae_ids: list[str],
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_workers: int = 4,
    revision: str | None = None,
) -> dict[int, SAE]:
    """Load several SAELens SAEs (downloads in parallel threads), keyed by the layer in each id.

    Transcoders get their input hook corrected to `blocks.{l}.mlp.hook_in` (the ln2 output they were
    trained on); the SAELens config names `blocks.{l}.hook_mlp_in`, the residual stream *before* ln2.
    GemmaScope 2 releases are read at one commit: `revision` (a branch, tag or sha; default
    `P3AG_HUB_REVISION`, else `main`) resolved once (`worlds.hub.resolve_revision`); each SAE's
    `cfg.metadata` keeps `hub_repo` and `hub_revision`, which `load_example_data_parallel(transcoders=...)`
    reads so that example data comes from the same commit.
    """
    converter, repo_id, sha = None, None, None
    if release.startswith("gemma-scope-2-"):
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        repo_id = get_pretrained_saes_directory()[release].repo_id
        try:
            sha = resolve_revision(repo_id, revision)
        except HubRequestError as err:
            raise _hub_error(f"{release} (its revision)", err, gated=None) from err
        converter = functools.partial(gemmascope_transcoder_loader, revision=sha)

    def load_one(sae_id: str) -> SAE:
        try:
            return SAE.from_pretrained(release, sae_id, device="cpu", converter=converter)
        # network and HTTP (OSError); an unexpected file (ValueError, KeyError); hf_xet's CAS errors
        # ("RuntimeError: Data processing error: CAS service error") and httpx's transport errors
        except (OSError, ValueError, KeyError, RuntimeError, *transport_errors()) as err:
            raise _hub_error(f"{release}/{sae_id}", err, gated=None) from err

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        loaded = list(pool.map(load_one, sae_ids))
    saes: dict[int, SAE] = {}
    for sae_id, sae in zip(sae_ids, loaded):  # moving to the device stays sequential
        layer = int(sae_id.split("_")[1])
        sae = sae.to(device=device, dtype=dtype)
        if getattr(sae.cfg.metadata, "hook_name_out", None):
            sae.cfg.metadata.hook_name = f"blocks.{layer}.mlp.hook_in"
        if sha is not None:
            sae.cfg.metadata.hub_repo, sae.cfg.metadata.hub_revision = repo_id, sha
        saes[layer] = sae
    return saes


def load_gemma_world(
    device: str = "cpu", dtype: torch.dtype = torch.float32, max_workers: int = 4, revision: str | None = None
) -> tuple[HookedSAETransformer, dict[int, SAE]]:
    """Gemma 3-1B IT and its 26 `width_16k_l0_small_affine` GemmaScope 2 transcoders, all from one commit of
    `google/gemma-scope-2-1b-it` (`revision`, see `load_saes_parallel`)."""
    token = load_hf_token()
    check_hub(GEMMA_MODEL)
    model = load_gemma_model(device=device, dtype=dtype, token=token)
    transcoders = load_saes_parallel(
        TRANSCODER_RELEASE, transcoder_ids(model.cfg.n_layers), device, dtype, max_workers, revision
    )
    return model, transcoders
