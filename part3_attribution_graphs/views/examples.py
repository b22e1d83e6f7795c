"""Feature example data: what makes each transcoder latent fire, in GemmaScope 2's file layout.

GemmaScope 2 ships, beside each transcoder's `params.safetensors`, an `examples.safetensors` in
`google/gemma-scope-2-{size}-{it|pt}` under `transcoder_all/layer_{l}_width_{w}_l0_{l0}[_affine]/`.
Its tensors (names and shapes as public code that reads these files uses them; F latents, K examples
per latent, N corpus sequences of length T; the dtypes are not documented, so readers here cast):

| key                   | shape    | meaning                                                            |
|-----------------------|----------|--------------------------------------------------------------------|
| `activations` | (F, K) | the K largest activations of each latent, largest first (0 = unused slot) |
| `seq_ids`             | (F, K)   | which corpus sequence each of them is in (rows of `tokens`)        |
| `positions`           | (F, K)   | the token position in that sequence                                |
| `feature_frequencies` | (F,)     | the fraction of corpus tokens on which the latent fires            |
| `top_tokens`          | (F, 10)  | token ids of the latent's largest direct logit effects              |
| `top_logits`          | (F, 10)  | those effects                                                       |
| `bottom_tokens`       | (F, 10)  | token ids of its most negative direct logit effects                 |
| `bottom_logits`       | (F, 10)  | those effects                                                       |
| `tokens`              | (N, T)   | the corpus, as token ids                                            |

A latent can appear several times in one sequence (at several positions), which is what lets us
shade more than one token per example. `make_toy_example_data` builds the same layout for the toy
world, so everything downstream also runs offline.

When only some latents are needed, `load_example_data(..., features=[...])` reads just their rows
and the sequences they point to (a full file is ~800 MB, most of it the corpus): from the hub by HTTP
range requests (`remote_safetensors`), or from a whole file in `local_dir`. The result then carries
`feature_ids` (which latent each row is), and `seq_ids` index its smaller `tokens`. A layer whose file
cannot be had can get the same layout from the world itself, for those latents only
(`local_example_rows`; `load_example_data_parallel(..., model=, transcoders=)` does that per layer).
Every failure is a `HubUnreachableError` whose `kind` says what went wrong (see `worlds.hub`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..checks import as_count, check_context
from ..guard import as_indices, guarded
from ..progress import tqdm
from ..worlds.hub import (
    HubRequestError,
    HubUnreachableError,
    hub_cache_dir,
    hub_download,
    hub_error,
    hub_offline,
    implicit_token,
    resolve_revision,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "EXAMPLE_KEYS",
    "example_repo_id",
    "example_file_path",
    "load_example_data",
    "load_example_data_parallel",
    "features_in_graph",
    "make_toy_example_data",
    "local_example_rows",
    "feature_row",
    "feature_examples",
    "activation_histogram",
    "inspect_feature",
]

# One row per latent in each of these; `tokens` is the corpus the rows point into.
_PER_FEATURE = (
    "activations",
    "seq_ids",
    "positions",
    "feature_frequencies",
    "top_tokens",
    "top_logits",
    "bottom_tokens",
    "bottom_logits",
)
EXAMPLE_KEYS = (*_PER_FEATURE, "tokens")

TOY_HINT = (
    "Offline, build example data for the toy world instead: "
    "`utils.make_toy_example_data(model, transcoders)`."
)


def example_repo_id(model_size: str = "1b", instruction_tuned: bool = True) -> str:
    """The hub repository of GemmaScope 2 for one Gemma 3 model, e.g. `google/gemma-scope-2-1b-it`."""
    return f"google/gemma-scope-2-{model_size}-{'it' if instruction_tuned else 'pt'}"


def example_file_path(
    layer: int, category: str = "transcoder_all", width: str = "16k", l0: str = "small", affine: bool = True
) -> str:
    """Path of one transcoder's example file inside the repository."""
    return f"{category}/layer_{layer}_width_{width}_l0_{l0}{'_affine' if affine else ''}/examples.safetensors"


def _download(repo_id: str, filename: str, local_dir: str | Path | None, revision: str | None = None) -> Path:
    """The local path of `filename`: read from `local_dir` if it is already there, else downloaded at
    `revision` (into `local_dir` if given, else huggingface_hub's cache), with `worlds.hub`'s retries,
    deadline and token rules."""
    if local_dir is not None and (Path(local_dir) / filename).is_file():
        return Path(local_dir) / filename
    try:
        return Path(hub_download(repo_id, filename, revision=revision, local_dir=local_dir))
    except Exception as err:  # network, auth, missing-file and Xet errors all come through here
        raise hub_error(
            f"{filename} of {repo_id}",
            err,
            f"Pass local_dir= a folder that already holds this file, or make example data locally. "
            f"{TOY_HINT}",
        ) from err


class _LocalFile:
    """The `RemoteSafetensors` interface over a safetensors file on disk."""

    def __init__(self, handle) -> None:
        self._f = handle

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def read_rows(self, key: str, rows: list[int], n_cols: int | None = None) -> Tensor:
        sl = self._f.get_slice(key)
        shape = sl.get_shape()
        if not rows:
            return torch.empty(0, *([min(n_cols or shape[1], shape[1])] if len(shape) == 2 else []))
        cols = slice(None) if n_cols is None or len(shape) == 1 else slice(0, n_cols)
        parts = [sl[r : r + 1] if len(shape) == 1 else sl[r : r + 1, cols] for r in rows]
        return torch.cat(parts)


def _read_subset(source, features: list[int], n_examples: int | None, where: str) -> dict[str, Tensor]:
    """Rows of `features` only, plus the corpus sequences they refer to, re-indexed.

    `source` is a `_LocalFile` or a `RemoteSafetensors`: anything with `keys`, `shape` and `read_rows`.
    """
    missing = [k for k in EXAMPLE_KEYS if k not in set(source.keys())]
    if missing:
        raise ValueError(f"{where} lacks {missing}; it has {sorted(source.keys())}.")
    n_features = source.shape("activations")[0]
    bad = [f for f in features if not 0 <= f < n_features]
    if bad:
        raise IndexError(f"latents {bad[:5]} are out of range: {where} has {n_features} latents.")
    data = {}
    for key in _PER_FEATURE:
        per_example = key in ("activations", "seq_ids", "positions")
        data[key] = source.read_rows(key, features, n_examples if per_example else None)
    seq = data["seq_ids"].long()
    n_seq, seq_len = source.shape("tokens")
    used = sorted({int(s) for s in seq[(data["activations"] > 0) & (seq >= 0) & (seq < n_seq)].tolist()})
    tokens = source.read_rows("tokens", used)
    data["tokens"] = tokens if used else torch.zeros(0, seq_len, dtype=torch.int32)
    remap = torch.full((max(used, default=-1) + 2,), -1, dtype=torch.long)
    remap[torch.tensor(used, dtype=torch.long)] = torch.arange(len(used))
    data["seq_ids"] = torch.where(seq >= 0, remap[seq.clamp(min=0, max=len(remap) - 1)], -1)
    data["feature_ids"] = torch.tensor(features, dtype=torch.long)
    return data


def _read_by_range(
    repo_id: str,
    filename: str,
    features: list[int],
    n_examples: int | None,
    cache: str | Path | None,
    revision: str = "main",
) -> dict[str, Tensor]:
    """`_read_subset` over HTTP range requests to the hub (the header and the needed rows only)."""
    from .remote_safetensors import RemoteSafetensors

    try:
        source = RemoteSafetensors(repo_id, filename, revision, token=implicit_token(), cache=cache)
        data = _read_subset(source, features, n_examples, f"{repo_id}/{filename}")
    except (
        OSError,
        ValueError,
        KeyError,
    ) as err:  # network and HTTP: OSError; a file not as expected: the rest
        raise hub_error(
            f"{filename} of {repo_id} by range requests",
            err,
            f"Pass local_dir= to download whole files, or make example data locally. {TOY_HINT}",
        ) from err
    return data


def load_example_data(
    layer: int,
    model_size: str = "1b",
    category: str = "transcoder_all",
    width: str = "16k",
    l0: str = "small",
    affine: bool = True,
    instruction_tuned: bool = True,
    repo_id: str | None = None,
    local_dir: str | Path | None = None,
    features: Iterable[int] | None = None,
    n_examples: int | None = None,
    range_cache: str | Path | None = None,
    revision: str | None = None,
) -> dict[str, Tensor]:
    """One transcoder's `examples.safetensors` from GemmaScope 2, as a dict of tensors.

    With `features` and no `local_dir`, only the file's header and the byte ranges of those latents' rows
    and of the corpus sequences they point to are read, by HTTP range requests (a graph's few dozen latents
    cost a few MB, not the ~800 MB file), and kept in a local cache; a whole file already in huggingface_hub's
    cache is read there instead. With `local_dir`, or without `features`, the whole file is downloaded (once,
    into `local_dir` if given) and read from disk. `HF_HUB_OFFLINE` (read when called) makes every read
    local: huggingface_hub's cache, the range cache, or an error of kind "offline".

    Args:
        layer: the transcoder's layer. model_size, instruction_tuned: pick the repository
        `google/gemma-scope-2-{size}-{it|pt}`. category, width, l0, affine: pick the transcoder folder, e.g.
        `transcoder_all/layer_3_width_16k_l0_small_affine`. repo_id: overrides the repository. local_dir:
        download whole files into (and, if the file is already there, read from) this folder. features: read
        only these latents (and the sequences they need); adds `feature_ids`. n_examples: keep only the first
        (largest) this many examples per latent. range_cache: the SQLite file that keeps ranges read from the
        hub (default
            `~/.cache/part3_attribution_graphs/hub_ranges.sqlite`). revision: the repository's branch, tag or
        commit (default `P3AG_HUB_REVISION`, else `main`), resolved to a commit sha once
        (`worlds.hub.resolve_revision`) and used for every request.

    Raises:
        HubUnreachableError: the file could not be downloaded or read.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    repo_id = repo_id or example_repo_id(model_size, instruction_tuned)
    filename = example_file_path(layer, category, width, l0, affine)
    if local_dir is None or not (Path(local_dir) / filename).is_file():
        try:
            revision = resolve_revision(repo_id, revision)
        except HubRequestError as err:
            raise hub_error(f"{filename} of {repo_id} (its revision)", err, TOY_HINT) from err
    if features is not None and local_dir is None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir(), revision=revision)
        if not isinstance(cached, str):  # not in huggingface_hub's cache already: read the rows by range
            feats = [int(i) for i in features]
            return _read_by_range(repo_id, filename, feats, n_examples, range_cache, revision)
        path = Path(cached)
    else:
        path = _download(repo_id, filename, local_dir, revision)
    if features is not None:
        try:
            with safe_open(str(path), framework="pt") as f:
                return _read_subset(_LocalFile(f), [int(i) for i in features], n_examples, str(path))
        except (ValueError, KeyError) as err:
            raise hub_error(f"{filename} of {repo_id}", err, TOY_HINT) from err
    data = load_file(str(path))
    missing = [k for k in EXAMPLE_KEYS if k not in data]
    if missing:
        raise HubUnreachableError(
            f"{path} lacks {missing}; it has {sorted(data)}: not the example data this code expects. "
            f"{TOY_HINT}",
            kind="unexpected answer",
        )
    if n_examples is not None:
        for key in ("activations", "seq_ids", "positions"):
            data[key] = data[key][:, :n_examples].contiguous()
    return data


def load_example_data_parallel(
    layers: Iterable[int],
    model_size: str = "1b",
    category: str = "transcoder_all",
    width: str = "16k",
    l0: str = "small",
    affine: bool = True,
    instruction_tuned: bool = True,
    repo_id: str | None = None,
    local_dir: str | Path | None = None,
    max_workers: int = 4,
    features_by_layer: dict[int, Iterable[int]] | None = None,
    n_examples: int | None = None,
    range_cache: str | Path | None = None,
    model=None,
    transcoders: dict | None = None,
    revision: str | None = None,
) -> dict[int, dict[str, Tensor]]:
    """`load_example_data` for several layers, in parallel threads; keyed by layer.

    Every layer is read at one commit: `revision` if given; else the commit `transcoders` were loaded from
    (`load_saes_parallel` notes it in each SAE's `cfg.metadata`), when they come from this repository;
    else `P3AG_HUB_REVISION` or `main`, resolved once.

    Each full file holds its own ~500 MB corpus, so loading all 26 layers whole needs ~20 GB of RAM.
    Pass `features_by_layer` (e.g. `features_in_graph(result)`) to read only what a graph needs: without
    `local_dir` that reads only those rows from the hub, by range requests (see `load_example_data`).

    With `model` and `transcoders` (and `features_by_layer`), a layer whose file cannot be had (not on the
    hub, refused, an unexpected schema, the hub out of reach) gets example rows made locally for its
    latents in `features_by_layer` only (`local_example_rows`), and a printed line says which layers and
    why; the other layers keep the hub's. Without them, the first failure raises.

    Raises:
        HubUnreachableError: a layer could not be loaded and there is no local fallback.
    """
    layers = list(layers)
    fallback = model is not None and transcoders is not None and features_by_layer is not None
    repo_id = repo_id or example_repo_id(model_size, instruction_tuned)
    if revision is None:
        revision = _transcoders_revision(transcoders, repo_id)
    if features_by_layer is not None and local_dir is None and not hub_offline():
        from ..worlds.hub import check_hub

        try:
            check_hub("the example data")  # once, so that no network fails in seconds, not per layer
        except HubUnreachableError as err:
            if not fallback:
                raise
            print(f"No example data from the hub ({err.kind}): making rows for the graph's latents locally.")
            return local_example_rows(model, transcoders, _pick(features_by_layer, layers))

    def load(layer: int) -> dict[str, Tensor] | HubUnreachableError:
        feats = None if features_by_layer is None else list(features_by_layer.get(layer, []))
        try:
            return load_example_data(
                layer,
                model_size,
                category,
                width,
                l0,
                affine,
                instruction_tuned,
                repo_id,
                local_dir,
                features=feats,
                n_examples=n_examples,
                range_cache=range_cache,
                revision=revision,
            )
        except HubUnreachableError as err:
            if not fallback:
                raise
            return err

    files = [example_file_path(layer, category, width, l0, affine) for layer in layers]
    if local_dir is None or not all((Path(local_dir) / f).is_file() for f in files):
        try:
            revision = resolve_revision(repo_id, revision)  # once, so that no two layers mix commits
        except HubRequestError as err:
            error = hub_error(f"the example data of {repo_id} (its revision)", err, TOY_HINT)
            if not fallback:
                raise error from err
            print(
                f"No example data from the hub ({error.kind}): making rows for the graph's latents locally."
            )
            return local_example_rows(model, transcoders, _pick(features_by_layer, layers))

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        loaded = dict(zip(layers, tqdm(pool.map(load, layers), total=len(layers), desc="Example data")))
    failed = {layer: err for layer, err in loaded.items() if isinstance(err, HubUnreachableError)}
    if failed:
        reasons = sorted({err.kind for err in failed.values()})
        print(
            f"No hub example data for layer(s) {sorted(failed)} ({', '.join(reasons)}; first: "
            f"{next(iter(failed.values()))}); making rows for their graph latents locally."
        )
        loaded.update(local_example_rows(model, transcoders, _pick(features_by_layer, failed)))
    return loaded


def _transcoders_revision(transcoders: dict | None, repo_id: str) -> str | None:
    """The commit `transcoders` were loaded from (`load_saes_parallel` notes it), if from `repo_id`."""
    for tc in (transcoders or {}).values():
        metadata = getattr(getattr(tc, "cfg", None), "metadata", None)
        if metadata is not None and getattr(metadata, "hub_repo", None) == repo_id:
            return getattr(metadata, "hub_revision", None)
    return None


def _pick(features_by_layer: dict[int, Iterable[int]], layers: Iterable[int]) -> dict[int, list[int]]:
    return {layer: sorted({int(f) for f in features_by_layer.get(layer, [])}) for layer in layers}


def _random_corpus(model, n_sequences: int, seq_len: int, seed: int) -> Tensor:
    """`n_sequences` random token sequences (special tokens left out), each starting with `<bos>`."""
    gen = torch.Generator().manual_seed(seed)
    tok = model.tokenizer
    special = set(tok.all_special_ids)
    words = torch.tensor([i for i in range(model.cfg.d_vocab) if i not in special])
    tokens = words[torch.randint(len(words), (n_sequences, seq_len), generator=gen)]
    tokens[:, 0] = tok.bos_token_id
    return tokens


def _world_corpus(
    model, tokens: Tensor | None, n_sequences: int, seq_len: int, seed: int
) -> tuple[Int[Tensor, "n_seq seq"], Bool[Tensor, "n_seq seq"]]:
    """The example corpus and its padding mask: `tokens` if given, else the planted world's own text
    (`planted.example_corpus`), else random token sequences."""
    from ..worlds import planted

    if tokens is None and planted.is_planted_model(model):
        tokens = planted.example_corpus()
    if tokens is None:
        tokens = _random_corpus(model, n_sequences, seq_len, seed)
    return tokens, tokens == model.tokenizer.pad_token_id


def _mlp_inputs(model, layers: list[int], tokens: Tensor, batch_size: int) -> dict[int, list[Tensor]]:
    """Each layer's MLP input (`blocks.{l}.mlp.hook_in`) on `tokens`, in batches, on the CPU."""
    names = [f"blocks.{layer}.mlp.hook_in" for layer in layers]
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for lo in range(0, len(tokens), batch_size):
        # Stop after the last layer's block: the unembedding (262k wide on Gemma) is not needed.
        _, cache = model.run_with_cache(
            tokens[lo : lo + batch_size].to(model.W_U.device),
            names_filter=lambda n: n in names,
            stop_at_layer=max(layers) + 1,
        )
        for layer in layers:
            out[layer].append(cache[f"blocks.{layer}.mlp.hook_in"].cpu())
    return out


def _logit_tables(W_dec: Tensor, W_U: Tensor, rows: Tensor, n_top: int) -> tuple:
    """Top and bottom `n_top` direct logit effects (`W_dec[rows] @ W_U`) of `rows`, 256 latents at a time."""
    tops, bots = [], []
    for lo in range(0, len(rows), 256):
        logits = W_dec[rows[lo : lo + 256].to(W_dec.device)] @ W_U
        tops.append(logits.topk(n_top, dim=1))
        bots.append(logits.topk(n_top, dim=1, largest=False))
    if not tops:
        empty = torch.zeros(0, n_top)
        return empty, empty.long(), empty, empty.long()
    cat = torch.cat
    return (
        cat([t.values for t in tops]).cpu(),
        cat([t.indices for t in tops]).cpu(),
        cat([b.values for b in bots]).cpu(),
        cat([b.indices for b in bots]).cpu(),
    )


def _example_args(a: dict) -> None:
    """The latents asked for exist in their layer's transcoder; a random corpus fits in the context."""
    model, transcoders, features = a["model"], a["transcoders"], a["features_by_layer"]
    if not transcoders:
        raise ValueError("transcoders is empty: pass the world's {layer: transcoder} dict.")
    if a.get("tokens") is None:
        check_context(model, a["seq_len"], "seq_len", hint="Pass a smaller seq_len")
    elif not isinstance(a["tokens"], Tensor):
        raise TypeError(
            f"tokens must be a 2-d tensor of token ids (n_seq, seq), got {type(a['tokens']).__name__}."
        )
    if features is None:
        return
    if not isinstance(features, Mapping):
        raise TypeError(
            "features_by_layer must be a dict {layer: latent indices} (e.g. features_in_graph(result)), got "
            f"{type(features).__name__}."
        )
    checked = {}
    for key, latents in features.items():
        layer = as_count(f"features_by_layer key {key!r}", key)
        if layer in transcoders:  # other layers are left out, as documented
            d_sae = transcoders[layer].cfg.d_sae
            latents = sorted(latents) if isinstance(latents, (set, frozenset)) else latents
            what = f"layer {layer}'s transcoder has {d_sae} latents"
            latents = as_indices(f"features_by_layer[{layer}]", latents, d_sae, what)
        checked[layer] = latents
    a["features_by_layer"] = checked


# Counts of the corpus: `seq_len` holds `<bos>` and at least one token.
_CORPUS = {"n_sequences": 1, "seq_len": 2, "n_examples": 1, "seed": 0, "batch_size": 1}


@guarded(model="model", transcoders="transcoders", counts=_CORPUS, check=_example_args)
@torch.no_grad()
def local_example_rows(
    model,
    transcoders: dict,
    features_by_layer: dict[int, Iterable[int]],
    n_sequences: int = 256,
    seq_len: int = 24,
    n_examples: int = 64,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[int, dict[str, Tensor]]:
    """Example data for the listed latents only, in the subset layout `load_example_data(features=...)`
    returns (rows in `feature_ids` order), made from the world itself as `make_toy_example_data` makes it
    (same random corpus, same rows for these latents), but encoding and tabling only these latents: on a
    16k-latent, 262k-token world that is seconds, not minutes."""
    layers = sorted(layer for layer in features_by_layer if layer in transcoders)
    if not layers:
        return {}
    tokens, padding = _world_corpus(model, None, n_sequences, seq_len, seed)
    seq_len = tokens.shape[1]
    inputs = _mlp_inputs(model, layers, tokens, batch_size)
    W_U = model.W_U.detach().float()
    n_top = min(10, W_U.shape[1])
    out = {}
    for layer in layers:
        tc = transcoders[layer]
        feats = torch.tensor(sorted({int(f) for f in features_by_layer[layer]}), dtype=torch.long)
        x = torch.cat(inputs[layer]).to(tc.W_enc.device, tc.W_enc.dtype)  # (n_seq, seq, d_model)
        idx = feats.to(tc.W_enc.device)
        pre = x @ tc.W_enc[:, idx] + tc.b_enc[idx]
        a = torch.where(pre > tc.threshold[idx], pre, 0.0).float().cpu()  # JumpReLU, these latents only
        a[:, 0] = 0.0  # <bos> and padding say nothing about the text
        a[padding] = 0.0
        flat = a.reshape(-1, len(feats)).T  # (n_feats, n_seq * seq)
        vals, where = flat.topk(min(n_examples, flat.shape[1]), dim=1)
        fired = vals > 0
        W_dec = tc.W_dec.detach().float().to(W_U.device)
        top_vals, top_ids, bot_vals, bot_ids = _logit_tables(W_dec, W_U, feats, n_top)
        out[layer] = {
            "activations": torch.where(fired, vals, 0.0),
            "seq_ids": torch.where(fired, where // seq_len, -1).long(),
            "positions": torch.where(fired, where % seq_len, -1).int(),
            "feature_frequencies": (a[:, 1:] > 0).float().sum(dim=(0, 1)) / (~padding[:, 1:]).sum(),
            "top_tokens": top_ids.int(),
            "top_logits": top_vals.float(),
            "bottom_tokens": bot_ids.int(),
            "bottom_logits": bot_vals.float(),
            "tokens": tokens.int(),
            "feature_ids": feats,
        }
    return out


def features_in_graph(result) -> dict[int, list[int]]:
    """The latents of a pruned graph, as `{layer: sorted latent indices}`."""
    from .neuronpedia import kept_nodes, node_kind

    out: dict[int, set[int]] = {}
    for node in kept_nodes(result):
        if node_kind(node) == "latent":
            out.setdefault(int(node.layer), set()).add(int(node.feature))
    return {layer: sorted(f) for layer, f in sorted(out.items())}


@guarded(
    model="model",
    transcoders="transcoders",
    token_rows="tokens",
    optional=("tokens",),
    counts=_CORPUS,
    check=_example_args,
)
@torch.no_grad()
def make_toy_example_data(
    model,
    transcoders: dict,
    n_sequences: int = 256,
    seq_len: int = 24,
    n_examples: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    features_by_layer: dict[int, Iterable[int]] | None = None,
    tokens: Int[Tensor, "n_seq seq"] | None = None,
) -> dict[int, dict[str, Tensor]]:
    """Example data for every transcoder of an offline world, in GemmaScope 2's layout (keyed by layer).

    Runs the model on a corpus, encodes each layer's MLP input with its transcoder, and keeps each
    latent's `n_examples` largest activations. The corpus is `tokens` if given (rows after `<bos>`,
    right-padded with the pad token), else the world's own text for the planted world
    (`planted.example_corpus`, so its latents can be labelled: a land, "opposite of"), else
    `n_sequences` random token sequences of `seq_len`. The `<bos>` and padding positions are left out,
    as their activations say nothing about the text.

    `features_by_layer` (e.g. `features_in_graph(result)`) limits the `top_*`/`bottom_*` logit tables
    to those latents (the others are left at zero): on a real vocabulary (Gemma's 262k tokens) the
    full tables cost minutes on a CPU, the rest seconds.
    """
    tokens, padding = _world_corpus(model, tokens, n_sequences, seq_len, seed)
    n_sequences, seq_len = tokens.shape
    inputs = _mlp_inputs(model, sorted(transcoders), tokens, batch_size)
    W_U = model.W_U.detach().float()
    n_top = min(10, W_U.shape[1])
    out = {}
    for layer, tc in sorted(transcoders.items()):
        a = torch.cat([tc.encode(x.to(tc.W_enc.device, tc.W_enc.dtype)).float().cpu() for x in inputs[layer]])
        a[:, 0] = 0.0  # <bos> and padding say nothing about the text
        a[padding] = 0.0
        flat = a.reshape(-1, a.shape[-1]).T  # (d_sae, n_seq * seq)
        k = min(n_examples, flat.shape[1])
        vals, idx = flat.topk(k, dim=1)
        fired = vals > 0
        # Direct logit effects W_dec @ W_U, in chunks of latents (a real vocabulary is 262k wide).
        W_dec = tc.W_dec.detach().float().to(W_U.device)
        if features_by_layer is None:
            rows = torch.arange(W_dec.shape[0])
        else:
            rows = torch.tensor(sorted({int(f) for f in features_by_layer.get(layer, [])}), dtype=torch.long)
        top_vals = torch.zeros(W_dec.shape[0], n_top)
        bot_vals = torch.zeros(W_dec.shape[0], n_top)
        top_ids = torch.zeros(W_dec.shape[0], n_top, dtype=torch.long)
        bot_ids = torch.zeros(W_dec.shape[0], n_top, dtype=torch.long)
        top_vals[rows], top_ids[rows], bot_vals[rows], bot_ids[rows] = _logit_tables(W_dec, W_U, rows, n_top)
        out[layer] = {
            "activations": torch.where(fired, vals, 0.0).float(),
            "seq_ids": torch.where(fired, idx // seq_len, -1).int(),
            "positions": torch.where(fired, idx % seq_len, -1).int(),
            "feature_frequencies": ((a[:, 1:] > 0).float().sum(dim=(0, 1)) / (~padding[:, 1:]).sum()).float(),
            "top_tokens": top_ids.int().cpu(),
            "top_logits": top_vals.float().cpu(),
            "bottom_tokens": bot_ids.int().cpu(),
            "bottom_logits": bot_vals.float().cpu(),
            "tokens": tokens.int(),
        }
    return out


def feature_row(example_data: dict[str, Tensor], feature_id: int) -> int | None:
    """Row of `feature_id` in the per-latent tensors (None if a subset load left it out)."""
    ids = example_data.get("feature_ids")
    if ids is None:
        n = example_data["activations"].shape[0]
        return int(feature_id) if 0 <= int(feature_id) < n else None
    hits = (ids == int(feature_id)).nonzero()
    return int(hits[0, 0]) if len(hits) else None


def _decoder(tokenizer):
    """Token id -> display string, caching each id once."""
    cache: dict[int, str] = {}

    def decode(ids: list[int]) -> list[str]:
        new = sorted({i for i in ids if i not in cache})
        if new:
            if tokenizer is None:
                cache.update({i: f"<{i}>" for i in new})
            else:
                cache.update(zip(new, tokenizer.batch_decode([[i] for i in new])))
        return [cache[i] for i in ids]

    return decode


def feature_examples(
    example_data: dict[str, Tensor],
    feature_id: int,
    tokenizer=None,
    n_examples: int = 5,
    left: int = 12,
    right: int = 4,
) -> list[dict]:
    """The latent's top sequences (one per distinct sequence, strongest first), windowed around the peak.

    Returns:
        A list of `{"seq_id", "max_act", "peak", "token_ids", "tokens", "acts"}`; `peak` indexes the window,
        and `acts[i]` is the latent's recorded activation on `tokens[i]` (0 where none was recorded).
    """
    row = feature_row(example_data, feature_id)
    if row is None:
        return []
    act = example_data["activations"][row].float()
    seq = example_data["seq_ids"][row].long()
    pos = example_data["positions"][row].long()
    corpus = example_data["tokens"]
    valid = (act > 0) & (seq >= 0) & (seq < corpus.shape[0]) & (pos >= 0) & (pos < corpus.shape[1])
    act, seq, pos = act[valid], seq[valid], pos[valid]
    order = act.argsort(descending=True)
    decode = _decoder(tokenizer)

    examples, seen = [], set()
    for j in order.tolist():
        s = int(seq[j])
        if s in seen:
            continue
        seen.add(s)
        p = int(pos[j])
        lo, hi = max(0, p - left), min(corpus.shape[1], p + right + 1)
        ids = corpus[s, lo:hi].tolist()
        pad = getattr(tokenizer, "pad_token_id", None)
        while len(ids) > p - lo + 1 and ids[-1] == pad:  # a padded corpus: no padding after the text
            ids.pop()
        acts = [0.0] * len(ids)
        same = seq == s
        for q, a in zip(pos[same].tolist(), act[same].tolist()):
            if lo <= q < hi:
                acts[q - lo] = max(acts[q - lo], float(a))
        examples.append(
            {
                "seq_id": s,
                "max_act": float(act[j]),
                "peak": p - lo,
                "token_ids": ids,
                "tokens": decode(ids),
                "acts": acts,
            }
        )
        if len(examples) >= n_examples:
            break
    return examples


def activation_histogram(
    example_data: dict[str, Tensor], feature_id: int, bins: int = 30
) -> tuple[Int[Tensor, " bins"], Float[Tensor, " bins_plus_1"]] | None:
    """Histogram `(counts, bin edges)` of the latent's recorded (top-K, nonzero) activations, or None."""
    row = feature_row(example_data, feature_id)
    if row is None:
        return None
    act = example_data["activations"][row].float()
    act = act[act > 0]
    if act.numel() == 0:
        return None
    lo, hi = 0.0, float(act.max())
    counts = torch.histc(act, bins=bins, min=lo, max=hi if hi > lo else lo + 1.0).long()
    edges = torch.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    return counts, edges


class FeatureTable:
    """One latent's top sequences as an HTML table with inline styles (they survive an untrusted notebook).

    `data` is the table as a DataFrame; `cell_styles` the CSS of each cell; the notebook shows the HTML,
    and plain-text viewers a one-line summary.
    """

    def __init__(self, data, cell_styles, caption: str):
        self.data, self.cell_styles, self.caption = data, cell_styles, caption

    def to_html(self) -> str:
        import html

        cell = "padding: 2px 4px; font-family: monospace; white-space: pre; border: 1px solid #e5e7eb;"
        head = "".join(
            f'<th style="{cell} background: #f9fafb;">{html.escape(str(c))}</th>'
            for c in ["", *self.data.columns]
        )
        rows = []
        for (name, values), (_, styles) in zip(self.data.iterrows(), self.cell_styles.iterrows()):
            cells = "".join(
                f'<td style="{cell} {st}">{html.escape(str(v))}</td>' for v, st in zip(values, styles)
            )
            rows.append(f'<tr><th style="{cell} text-align: left;">{html.escape(str(name))}</th>{cells}</tr>')
        return (
            f'<table style="border-collapse: collapse; font-size: 12px;"><caption style="text-align: left; '
            f'caption-side: top; padding: 2px 0;">{html.escape(self.caption)}</caption><thead><tr>{head}</tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        return f"{self.caption} ({len(self.data)} rows; shown as a table in a notebook)"


def inspect_feature(
    example_data: dict[str, Tensor],
    feature_id: int,
    tokenizer: PreTrainedTokenizerBase | None,
    n_examples: int = 5,
    left: int = 12,
    right: int = 4,
    layer: int | None = None,
) -> FeatureTable:
    """A table of one latent's top sequences: a row per example, a column per token offset from the peak.

    Cells are shaded green by the latent's activation on that token; tokens that are among the
    latent's top (bottom) direct logit effects are underlined blue (red). Newlines show as ⏎.
    `layer` names the latent's layer in the caption ("Latent 302 @ layer 2").
    """
    import pandas as pd

    from .palette import ACTIVATION_RGB, EDGE_NEGATIVE, EDGE_POSITIVE

    name = f"Latent {feature_id}" + (f" @ layer {layer}" if layer is not None else "")
    examples = feature_examples(example_data, feature_id, tokenizer, n_examples, left, right)
    if not examples:
        empty = pd.DataFrame({"note": [f"No recorded activations for {name.lower()}."]})
        return FeatureTable(empty, pd.DataFrame({"note": [""]}), name)
    row = feature_row(example_data, feature_id)
    # All-zero tables mean "not computed" (see make_toy_example_data's features_by_layer).
    has_logits = bool(example_data["top_logits"][row].abs().sum() > 0)
    top_ids = set(example_data["top_tokens"][row].tolist()) if has_logits else set()
    bottom_ids = set(example_data["bottom_tokens"][row].tolist()) if has_logits else set()
    peak_act = max(e["max_act"] for e in examples)

    offsets = range(-left, right + 1)
    cols = [f"{o:+d}" if o else "0" for o in offsets]
    text, styles = [], []
    for e in examples:
        cells, css = [""] * len(cols), [""] * len(cols)
        for i, (t, a, tid) in enumerate(zip(e["tokens"], e["acts"], e["token_ids"])):
            c = i - e["peak"] + left
            cells[c] = t.replace("\n", "⏎")
            rules = []
            if a > 0:
                rules.append(f"background-color: rgba({ACTIVATION_RGB}, {0.15 + 0.85 * a / peak_act:.2f})")
            if tid in top_ids:
                rules.append(f"border-bottom: 3px solid {EDGE_POSITIVE}")
            elif tid in bottom_ids:
                rules.append(f"border-bottom: 3px solid {EDGE_NEGATIVE}")
            css[c] = "; ".join(rules)
        text.append([f"{e['max_act']:.3g}"] + cells)
        styles.append([""] + css)

    df = pd.DataFrame(text, columns=["max act"] + cols, index=[f"seq {e['seq_id']}" for e in examples])
    css_df = pd.DataFrame(styles, columns=df.columns, index=df.index)
    return FeatureTable(
        df,
        css_df,
        f"{name}: top {len(examples)} sequences (green: activation; underline: "
        "blue = among its top logit tokens, red = bottom)",
    )
