"""The real world: Gemma 3-1B IT with the GemmaScope 2 transcoders, loaded from the Hugging Face hub.

Gemma is gated, so loading needs a Hugging Face token (`HF_TOKEN` in a `.env` file, see
`.env.example`). Without a token or without network, every loader here raises an error that says
so and names the offline worlds (see `worlds.hub`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from sae_lens import SAE, HookedSAETransformer

from .hub import OFFLINE_HINT, HubUnreachableError, MissingTokenError, check_hub, load_hf_token, use_token

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
    access = (
        f"that your HF_TOKEN has access to {gated}" if gated else "(if the repository is gated) your HF_TOKEN"
    )
    return HubUnreachableError(
        f"Could not load {what} from the Hugging Face hub ({type(err).__name__}: {err}). Check your network "
        f"and {access}. {OFFLINE_HINT}"
    )


def load_gemma_model(
    device: str = "cpu", dtype: torch.dtype = torch.float32, token: str | None = None
) -> HookedSAETransformer:
    """Gemma 3-1B IT as a `HookedSAETransformer`, unprocessed (no folded norms, no centring)."""
    use_token(token or load_hf_token())
    try:
        model = HookedSAETransformer.from_pretrained_no_processing(GEMMA_MODEL, device=device, dtype=dtype)
    except OSError as err:  # what transformers raises for network, auth and missing-file failures
        raise _hub_error(GEMMA_MODEL, err) from err
    model.set_use_hook_mlp_in(True)
    return model


def load_saes_parallel(
    release: str,
    sae_ids: list[str],
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_workers: int = 4,
) -> dict[int, SAE]:
    """Load several SAELens SAEs (downloads in parallel threads), keyed by the layer in each id.

    Transcoders get their input hook corrected to `blocks.{l}.mlp.hook_in` (the ln2 output they were
    trained on); the SAELens config names `blocks.{l}.hook_mlp_in`, the residual stream *before* ln2.
    """

    def load_one(sae_id: str) -> SAE:
        try:
            return SAE.from_pretrained(release, sae_id, device="cpu")
        except OSError as err:
            raise _hub_error(f"{release}/{sae_id}", err, gated=None) from err

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        loaded = list(pool.map(load_one, sae_ids))
    saes: dict[int, SAE] = {}
    for sae_id, sae in zip(sae_ids, loaded):  # moving to the device stays sequential
        layer = int(sae_id.split("_")[1])
        sae = sae.to(device=device, dtype=dtype)
        if getattr(sae.cfg.metadata, "hook_name_out", None):
            sae.cfg.metadata.hook_name = f"blocks.{layer}.mlp.hook_in"
        saes[layer] = sae
    return saes


def load_gemma_world(
    device: str = "cpu", dtype: torch.dtype = torch.float32, max_workers: int = 4
) -> tuple[HookedSAETransformer, dict[int, SAE]]:
    """Gemma 3-1B IT and its 26 `width_16k_l0_small_affine` GemmaScope 2 transcoders."""
    token = load_hf_token()
    check_hub(GEMMA_MODEL)
    model = load_gemma_model(device=device, dtype=dtype, token=token)
    transcoders = load_saes_parallel(
        TRANSCODER_RELEASE, transcoder_ids(model.cfg.n_layers), device, dtype, max_workers
    )
    return model, transcoders
