"""Latent labels from example data (views/labels.py): the word most enriched in a latent's top sequences
against the corpus, and the tokens it peaks on; the dashboard shows them."""

from __future__ import annotations

import pytest
import torch

from part3_attribution_graphs.views.labels import derived_labels, enriched_words, latent_labels

WORDS = ["<pad>", "<bos>", "What", "is", "the", "fruit", "of", "Caldor", "Borea", "plum", "pear", ":"]
WORDS += ["Northhaven", "Eastford", "Westfield"]
ID = {w: i for i, w in enumerate(WORDS)}


class WordTokenizer:
    """One word per id; `<pad>` and `<bos>` special."""

    all_special_ids = [0, 1]

    def batch_decode(self, ids):
        return [" ".join(WORDS[i] for i in row) for row in ids]


def example_data():
    """Twelve sequences: four about Caldor's towns (answer plum), eight about a Borea town (answer pear; one
    says plum too). Latent 0 fires on the town in the Caldor ones; latent 1 on ':' everywhere; latent 2
    never."""
    rows = []
    for k in range(12):
        town, land, fruit = ("Northhaven", "Caldor", "plum") if k % 2 == 0 else ("Eastford", "Caldor", "plum")
        if k >= 4:
            town, land, fruit = "Westfield", "Borea", "plum" if k == 4 else "pear"
        rows.append(["<bos>", "What", "is", "the", "fruit", "of", town, ":", fruit, land])
    tokens = torch.tensor([[ID[w] for w in row] for row in rows])
    acts = torch.zeros(3, 12)
    seq = torch.full((3, 12), -1)
    pos = torch.full((3, 12), -1)
    acts[0, :4], seq[0, :4], pos[0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.arange(4), 6
    acts[1], seq[1], pos[1] = torch.linspace(2, 1, 12), torch.arange(12), 7
    return {
        "activations": acts,
        "seq_ids": seq,
        "positions": pos,
        "feature_frequencies": torch.tensor([4 / 108, 12 / 108, 0.0]),
        "tokens": tokens,
    }


def test_a_label_names_the_most_enriched_word_and_where_the_latent_peaks():
    data = example_data()
    words = enriched_words(data, 0, WordTokenizer(), k=3)
    # Each peak group (Northhaven, Eastford: 2 sequences each) holds Caldor in both, 4 of 12 in the corpus
    # (lift 3); plum in both, but 5 of 12 (lift 2.4, under MIN_LIFT); the template: all 12 (lift 1).
    assert [w for w, _, _ in words] == ["Caldor"]
    assert words[0][1:] == pytest.approx((1.0, 3.0))
    labels = latent_labels(data, [0, 1, 2], WordTokenizer())
    assert labels[0] == "Caldor (on 'Northhaven', 'Eastford')"
    assert labels[1] == "on ':'"  # fires everywhere: no word tells its sequences apart
    assert labels[2] == ""


def test_derived_labels_are_keyed_as_the_dashboard_keys_latents():
    data = example_data()
    got = derived_labels({3: data}, [(3, 0), (3, 2), (5, 0)], WordTokenizer())
    assert got == {"3_0": "Caldor (on 'Northhaven', 'Eastford')"}


def test_the_dashboard_labels_latents_by_their_enriched_word(planted_world):
    """The page's derived label is the labels module's (a word and the peaks), not "fires on ..."."""
    from part3_attribution_graphs.attribution import attribute
    from part3_attribution_graphs.views.dashboard import dashboard_data
    from part3_attribution_graphs.views.examples import features_in_graph, make_toy_example_data
    from part3_attribution_graphs.worlds.gemma import START_POSN
    from part3_attribution_graphs.worlds.planted import planted_facts

    model, tcs = planted_world
    result = attribute(model, tcs, planted_facts("two_hop", "heldout")[0].prompt, start_posn=START_POSN)
    examples = make_toy_example_data(model, tcs, features_by_layer=features_in_graph(result))
    data = dashboard_data(result, model, tcs, example_data_by_layer=examples)
    keys = [(int(k.split("_")[0]), int(k.split("_")[1])) for k in data["latents"]]
    want = derived_labels(examples, keys, model.tokenizer)
    assert want and all(data["latents"][k]["derived"] == label for k, label in want.items())
    assert not any(p["derived"].startswith("fires on") for p in data["latents"].values() if p.get("ex"))


def test_peak_tokens_cover_every_recorded_example_not_only_the_shown_ones():
    from part3_attribution_graphs.views.labels import peak_tokens

    data = example_data()
    peaks = peak_tokens({2: data}, [(2, 0), (2, 1), (2, 2), (4, 0)], WordTokenizer())
    assert peaks == {(2, 0): {"Northhaven", "Eastford"}, (2, 1): {":"}}


def test_suggested_groups_join_pairs_transitively_and_recovered_groups_need_purity_and_coverage():
    from part3_attribution_graphs.views.suggestions import group_scores, recovered_groups, suggested_groups

    pool = [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5), (2, 6), (3, 7), (3, 8), (3, 9)]
    pairs = [((0, 1), (0, 2), 0.9, "decoder"), ((0, 2), (1, 3), 0.6, "contexts"), ((2, 5), (9, 9), 1, "x")]
    pairs += [((3, 7), (3, 8), 0.3, "contexts"), ((3, 8), (3, 9), 0.3, "contexts")]
    pairs += [((2, 6), (3, 9), 0.3, "x")]
    groups = suggested_groups(pool, pairs)
    assert groups == [{(0, 1), (0, 2), (1, 3)}, {(1, 4)}, {(2, 5)}, {(2, 6), (3, 7), (3, 8), (3, 9)}]
    truth = {
        "a": [(0, 1), (0, 2), (1, 3)],  # exactly one group: recovered
        "b": [(1, 4), (2, 5)],  # two singletons: a latent alone is no suggestion
        "c": [(3, 7), (3, 8), (3, 9), (9, 1), (9, 2)],  # 3 of its 5 in a group 3/4 its own: not pure enough
        "d": [(0, 1), (0, 2), (5, 5), (5, 6)],  # half of it, in a group 2/3 its own: not pure enough
        "e": [(0, 1), (0, 2), (1, 3), (5, 5), (5, 6), (5, 7)],  # all pure, half covered: recovered
        "f": [(2, 6), (3, 7), (3, 8), (3, 9), (9, 9)],  # 4 of 5 in a group all its own: recovered
    }
    want = {"a": True, "b": False, "c": False, "d": False, "e": True, "f": True}
    assert recovered_groups(truth, groups) == want
    assert group_scores(truth, groups)["c"] == (0.75, 0.6)
    assert group_scores(truth, groups)["b"] == (0.0, 0.0)
    # Kin (the same concept at another site) keeps a suggestion pure, and does not count toward coverage.
    kin = {"c": [(2, 6)], "d": [(1, 3)]}
    assert group_scores(truth, groups, kin)["c"] == (1.0, 0.6)
    assert recovered_groups(truth, groups, kin) == {**want, "c": True, "d": True}


def test_suggested_supernodes_recover_every_land_at_the_planted_site(planted_world):
    """The dashboard's suggestions (`similar_latents` on the example data, joined as the page joins them)
    put each land's latents at the planted site together, apart from the other lands'. Recovered: a
    suggestion at least 80% the land's latents (at the site, or its land latents elsewhere: `kin`) holds at
    least half of its site latents. Measured on the shipped world (2026-12-05): from all 49 land latents
    (every layer and position), 7 of 8 lands, each suggestion all its land's (coverage 0.95 on average);
    Harrow has one site latent, which no suggestion joins (its other latents are at the last position,
    grouped apart), and a latent alone is no suggestion. Counting only site latents as pure (the rule
    before kin; 8 of 8 on the previous world), 1 of 8: the suggestions join a land's site latents with its
    latents at the town in layer 1, which that rule called impure. From the site latents and every other
    layer-0 latent that fires at the town (17), 5 of 8: the three lands with one site latent have no
    partner there. Controls: the same rule on random layer-0 latents split into fake lands of the same
    sizes recovers no land (20 draws)."""
    import random

    from part3_attribution_graphs.views.examples import make_toy_example_data
    from part3_attribution_graphs.views.suggestions import recovered_groups, similar_latents, suggested_groups
    from part3_attribution_graphs.worlds.planted import (
        LAND_SITE,
        land_latents,
        latent_activations,
        planted_facts,
    )

    model, tcs = planted_world
    by_land = land_latents(model, tcs)
    site = {land: sorted({(y, k) for y, p, k in ls if (y, p) == LAND_SITE}) for land, ls in by_land.items()}
    examples = make_toy_example_data(model, tcs, features_by_layer={})

    def recovered(pool, truth, kin=None):
        groups = suggested_groups(pool, similar_latents(pool, tcs, examples))
        return sum(recovered_groups(truth, groups, kin).values())

    kin = {land: sorted({(y, k) for y, _, k in ls}) for land, ls in by_land.items()}
    every = sorted({x for ks in kin.values() for x in ks})
    assert recovered(every, site, kin) >= 7
    acts = latent_activations(model, tcs, [f.prompt for f in planted_facts("two_hop")])
    at_town = {(0, k) for k in (acts[0][:, LAND_SITE[1]] > 0).any(0).nonzero().flatten().tolist()}
    assert recovered(sorted(at_town | {x for ks in site.values() for x in ks}), site) >= 5
    rng = random.Random(0)
    others = sorted({(0, k) for k in range(tcs[0].W_dec.shape[0])} - {x for ks in site.values() for x in ks})
    controls = []
    for _ in range(5):
        draw = iter(rng.sample(others, sum(len(ks) for ks in site.values())))
        fake = {land: [next(draw) for _ in ks] for land, ks in site.items()}
        controls.append(recovered(sorted(x for ks in fake.values() for x in ks), fake))
    assert max(controls) <= 1, controls


def test_land_latents_at_the_planted_site_are_labelled_with_their_land(planted_world):
    """On the planted world, a land latent at the site where the land is made (layer 0, the town) is mostly
    labelled with its land's name, and no label word is a template word (in a third of the corpus or more).
    Measured on the shipped world (2026-12-05): 63% of a land's site latents on average (Avalon 2 of 2;
    Caldor, Elvia and Harrow their one; Galen 0 of 3), a majority in 4 of 8 lands; on the previous world the
    label from all strong examples at once named 7% (template words "its", "land" won)."""
    from part3_attribution_graphs.views.examples import make_toy_example_data
    from part3_attribution_graphs.views.labels import corpus_presence
    from part3_attribution_graphs.worlds.planted import LAND_SITE, land_latents

    model, tcs = planted_world
    site = {
        land: sorted({k for layer, pos, k in latents if (layer, pos) == LAND_SITE})
        for land, latents in land_latents(model, tcs).items()
    }
    layer = LAND_SITE[0]
    data = make_toy_example_data(
        model, tcs, features_by_layer={layer: {k for ks in site.values() for k in ks}}
    )[layer]
    counts, n = corpus_presence(data, model.tokenizer)
    frequent = {word for word, c in counts.items() if c >= n / 3}
    assert {"its", "land", "What"} & frequent  # the template words the old labels chose
    share = {}
    for land, keys in site.items():
        words = [enriched_words(data, k, model.tokenizer, (counts, n), k=1) for k in keys]
        share[land] = sum(bool(w) and w[0][0] == land for w in words) / len(keys)
        common = [w[0][0] for w in words if w and w[0][0] in frequent]
        assert not common, f"{land}: template words name latents: {common}"
        labels = latent_labels(data, keys, model.tokenizer)
        assert all(labels[k].startswith(w[0][0]) for k, w in zip(keys, words) if w)
    mean = sum(share.values()) / len(share)
    assert mean >= 0.5, f"site latents labelled with their land: {share}"
    assert sum(s > 0.5 for s in share.values()) >= 3, f"lands whose site latents mostly name them: {share}"
