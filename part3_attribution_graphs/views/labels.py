"""Latent labels derived from example data: what a latent responds to, in words.

A latent's recorded top activations (GemmaScope 2's example layout, `views/examples.py`) sit in
sequences of a corpus; a label reads the strong ones (at least `TOP_SHARE` of its largest). The word
that best tells those sequences apart from the corpus, the one most *enriched* in them, says what the
latent responds to; the tokens it peaks on say where: a latent whose strong examples are the towns of
one land, in sequences that name the land, reads "Caldor (on 'Northhaven', 'Eastford')", where the
peak tokens alone would say "fires on 'Northhaven', 'Eastford'".

Enrichment of a word w in a set of sequences: `support = n_set(w) / n_set` (the share of them that
contain it) against `background = n_corpus(w) / n_corpus` (the share of corpus sequences that do);
`lift = support / background`. A word in most of the corpus cannot reach `MIN_LIFT`, so template
words never name a latent. Latents are often polysemantic (a layer-0 land latent fires on its land's
towns and, as strongly, on "opposite" or "."), so one set of all its examples mixes its meanings and
the template words they share win. The label therefore reads the latent's recorded examples grouped
by the token they peak on: each group of two or more sequences names its most enriched word (lift at
least `MIN_LIFT`, in at least `MIN_SUPPORT` of the group and two sequences, not a token the latent
peaks on), and the label's word is the one named by the most examples: the three towns of a land
each name the land (the lines "Ambry is in Harrow." and the single-hop answers), so the land wins.
A subset load of hub example data (`load_example_data(features=...)`) keeps only the sequences some
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
    "MIN_LIFT",
    "corpus_presence",
    "enriched_words",
    "latent_labels",
    "derived_labels",
    "peak_tokens",
]

TOP_SHARE = 0.5  # the examples a label reads: activations at least this share of the latent's largest
MIN_SUPPORT = 0.2  # a label word is in at least this share of a peak group's sequences (and in two)
MIN_LIFT = 3.0  # ... and at least this many times as common there as in the corpus (measured: 3 and 5 alike)


def _words(tokenizer, ids: Iterable[int]) -> dict[int, str]:
    """Token id -> its text, for ids that are words (letters or digits; no special token)."""
    ids = sorted({int(i) for i in ids})
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    texts = tokenizer.batch_decode([[i] for i in ids]) if tokenizer is not None else [f"<{i}>" for i in ids]
    return {i: t.strip() for i, t in zip(ids, texts) if i not in special and any(c.isalnum() for c in t)}


def _word_sets(rows: list[list[int]], word_of: dict[int, str]) -> list[set[str]]:
    """Each row's words: token ids with the same text (" What", "What") are one word."""
    return [{word_of[i] for i in row if i in word_of} for row in rows]


def corpus_presence(example_data: dict, tokenizer=None) -> tuple[Counter, int]:
    """`(sequences containing each word, number of sequences)` of the example data's corpus."""
    rows = example_data["tokens"].tolist()
    word_of = _words(tokenizer, {i for row in rows for i in row})
    counts: Counter = Counter()
    for words in _word_sets(rows, word_of):
        counts.update(words)
    return counts, len(rows)


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


def _peak_groups(example_data: dict, feature: int) -> dict[int, set[int]]:
    """`{token id: the sequences where the latent's recorded examples peak on it}`, over all of them."""
    row = feature_row(example_data, feature)
    if row is None:
        return {}
    act = example_data["activations"][row].float()
    seq = example_data["seq_ids"][row].long()
    pos = example_data["positions"][row].long()
    corpus = example_data["tokens"]
    valid = (act > 0) & (seq >= 0) & (seq < corpus.shape[0]) & (pos >= 0) & (pos < corpus.shape[1])
    groups: dict[int, set[int]] = {}
    for s, p in zip(seq[valid].tolist(), pos[valid].tolist()):
        groups.setdefault(int(corpus[s, p]), set()).add(s)
    return groups


def enriched_words(
    example_data: dict, feature: int, tokenizer=None, presence: tuple[Counter, int] | None = None, k: int = 3
) -> list[tuple[str, float, float]]:
    """The `k` words named by the most of the latent's examples, best first: `(word, share of its examples
    whose peak group names it, the largest lift it has in such a group)` (see the module docstring)."""
    groups = _peak_groups(example_data, feature)
    if not groups:
        return []
    counts, n_corpus = presence if presence is not None else corpus_presence(example_data, tokenizer)
    corpus = example_data["tokens"]
    rows = {s: corpus[s].tolist() for seqs in groups.values() for s in seqs}
    word_of = _words(tokenizer, {i for row in rows.values() for i in row} | set(groups))
    peak_words = {word_of[i] for i in groups if i in word_of}
    votes: Counter = Counter()
    lifts: dict[str, float] = {}
    for seqs in groups.values():
        if len(seqs) < 2:
            continue
        inside: Counter = Counter()
        for words in _word_sets([rows[s] for s in seqs], word_of):
            inside.update(words - peak_words)
        best = None
        for word, n in inside.items():
            support = n / len(seqs)
            lift = support / (counts[word] / n_corpus)
            if support >= MIN_SUPPORT and n >= 2 and lift >= MIN_LIFT:
                best = max(best or (lift, support, word), (lift, support, word))
        if best is not None:
            votes[best[2]] += len(seqs)
            lifts[best[2]] = max(lifts.get(best[2], 0.0), best[0])
    total = sum(len(seqs) for seqs in groups.values())
    ranked = sorted(votes, key=lambda w: (-votes[w], -lifts[w], w))
    return [(w, votes[w] / total, lifts[w]) for w in ranked[:k]]


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
    presence = corpus_presence(example_data, tokenizer)
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
    shows), for the latents whose layer has example data."""
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
