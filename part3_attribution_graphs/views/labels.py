"""Latent labels derived from example data: what a latent responds to, in words.

A latent's recorded top activations (GemmaScope 2's example layout, `views/examples.py`) sit in
sequences of a corpus; a label reads the strong ones (at least `TOP_SHARE` of its largest). The word
that best tells those sequences apart from the corpus, the one most *enriched* in them, says what the
latent responds to; the tokens it peaks on say where: a latent whose strong examples are the towns of
one land, in sequences that name the land, reads "Caldor (on 'Northhaven', 'Eastford')", where the
peak tokens alone would say "fires on 'Northhaven', 'Eastford'".

Enrichment of a word w: `support = n_top(w) / n_top` (the share of the latent's top sequences that
contain it) against `background = n_corpus(w) / n_corpus` (the share of corpus sequences that do).
The label's word has the largest `lift = support / background` among the words in at least
`MIN_SUPPORT` of the top sequences (and two of them), ties going to the larger support: the template
words of the questions a latent fires in are enriched a little, the name they share a lot. The peak
tokens themselves are left out of the candidates, so the word says something the peaks do not. A
subset load of hub example data (`load_example_data(features=...)`) keeps only the sequences some
loaded latent needs, so there the background is that smaller corpus.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from .examples import feature_row

__all__ = [
    "TOP_SHARE",
    "MIN_SUPPORT",
    "corpus_presence",
    "enriched_words",
    "latent_labels",
    "derived_labels",
    "peak_tokens",
]

TOP_SHARE = 0.5  # the examples a label reads: activations at least this share of the latent's largest
MIN_SUPPORT = 0.2  # a label word is in at least this share of the latent's top sequences (and in two)


def _words(tokenizer, ids: Iterable[int]) -> dict[int, str]:
    """Token id -> its text, for ids that are words (letters or digits; no special token)."""
    ids = sorted({int(i) for i in ids})
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    texts = tokenizer.batch_decode([[i] for i in ids]) if tokenizer is not None else [f"<{i}>" for i in ids]
    return {i: t.strip() for i, t in zip(ids, texts) if i not in special and any(c.isalnum() for c in t)}


def corpus_presence(example_data: dict) -> tuple[Counter, int]:
    """`(sequences containing each token id, number of sequences)` of the example data's corpus."""
    tokens = example_data["tokens"]
    counts: Counter = Counter()
    for row in tokens.tolist():
        counts.update(set(row))
    return counts, int(tokens.shape[0])


def _top_sequences(example_data: dict, feature: int) -> tuple[list[int], Counter]:
    """The latent's recorded sequences (distinct) and the token ids it peaks on, counted per sequence."""
    row = feature_row(example_data, feature)
    if row is None:
        return [], Counter()
    act = example_data["activations"][row].float()
    seq = example_data["seq_ids"][row].long()
    pos = example_data["positions"][row].long()
    corpus = example_data["tokens"]
    valid = (act > 0) & (seq >= 0) & (seq < corpus.shape[0]) & (pos >= 0) & (pos < corpus.shape[1])
    valid &= act >= TOP_SHARE * act.max()  # its strong activations: a weak one says little about it
    seq, pos = seq[valid], pos[valid]
    peaks: Counter = Counter()
    for s in torch.unique(seq).tolist():
        peaks.update({int(t) for t in corpus[s, pos[seq == s]].tolist()})
    return sorted(set(seq.tolist())), peaks


def enriched_words(
    example_data: dict, feature: int, tokenizer=None, presence: tuple[Counter, int] | None = None, k: int = 3
) -> list[tuple[str, float, float]]:
    """The `k` words most enriched in the latent's top sequences, best first: `(word, support, lift)`
    (`lift = support / background`, see the module docstring); its peak tokens left out."""
    seqs, peaks = _top_sequences(example_data, feature)
    if not seqs:
        return []
    counts, n_corpus = presence if presence is not None else corpus_presence(example_data)
    corpus = example_data["tokens"]
    inside: Counter = Counter()
    for s in seqs:
        inside.update(set(corpus[s].tolist()))
    words = _words(tokenizer, [i for i in inside if i not in peaks])
    scored = []
    for i, word in words.items():
        support, background = inside[i] / len(seqs), counts[i] / n_corpus
        if support >= MIN_SUPPORT and inside[i] >= 2 and support > background:
            scored.append((word, support, support / background))
    scored.sort(key=lambda x: (-x[2], -x[1], x[0]))
    return scored[:k]


def _peak_text(peaks: Counter, tokenizer) -> str:
    """The tokens a latent peaks on, most frequent first: one if it dominates, else up to three."""
    if not peaks:
        return ""
    ids = [i for i, _ in peaks.most_common()]
    texts = (
        tokenizer.batch_decode([[i] for i in ids[:3]])
        if tokenizer is not None
        else [f"<{i}>" for i in ids[:3]]
    )
    shown = [repr(t.strip() or t) for t in texts]
    if peaks[ids[0]] >= 0.8 * sum(peaks.values()):
        return shown[0]
    return ", ".join(shown) + (", ..." if len(ids) > 3 else "")


def latent_labels(example_data: dict, features: Iterable[int], tokenizer=None) -> dict[int, str]:
    """`{feature: label}`: the most enriched word of each latent's top sequences and the tokens it peaks
    on, "Caldor (on 'Northhaven', 'Eastford')"; "on ':'" when no word is enriched; "" without examples."""
    presence = corpus_presence(example_data)
    out = {}
    for f in features:
        _, peaks = _top_sequences(example_data, f)
        best = enriched_words(example_data, f, tokenizer, presence, k=1)
        where = _peak_text(peaks, tokenizer)
        if best:
            out[int(f)] = f"{best[0][0]} (on {where})" if where else best[0][0]
        else:
            out[int(f)] = f"on {where}" if where else ""
    return out


def derived_labels(
    example_data_by_layer: dict[int, dict], latents: Iterable[tuple[int, int]], tokenizer=None
) -> dict[str, str]:
    """`{"layer_latent": label}` (the dashboard's keys) for the latents whose layer has example data."""
    by_layer: dict[int, list[int]] = {}
    for layer, f in latents:
        if layer in example_data_by_layer:
            by_layer.setdefault(int(layer), []).append(int(f))
    return {
        f"{layer}_{f}": label
        for layer, feats in by_layer.items()
        for f, label in latent_labels(example_data_by_layer[layer], feats, tokenizer).items()
        if label
    }


def peak_tokens(
    example_data_by_layer: dict[int, dict], latents: Iterable[tuple[int, int]], tokenizer=None
) -> dict[tuple[int, int], set[str]]:
    """`{(layer, latent): the tokens it peaks on}` over all its recorded examples (not only those a page
    shows), for the latents whose layer has example data: what `suggestions.similar_latents` compares."""
    out = {}
    for layer, f in latents:
        data = example_data_by_layer.get(layer)
        if data is None:
            continue
        _, peaks = _top_sequences(data, f)
        if peaks:
            ids = sorted(peaks)
            texts = (
                tokenizer.batch_decode([[i] for i in ids])
                if tokenizer is not None
                else [f"<{i}>" for i in ids]
            )
            out[layer, f] = set(texts)
    return out
