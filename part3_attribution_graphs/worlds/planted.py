"""The planted world: a small Gemma 3 trained from scratch on facts whose mechanisms we planted.

API (what checks, the lesson and the benchmark read):

- `load_planted_world(device="cpu") -> (model, transcoders)`: the same types as `make_toy_world`, read
  from the safetensors files shipped in `worlds/planted_data/` (no training, well under a second).
- `planted_facts(mechanism=None, split=None) -> list[PlantedFact]`: every planted prompt with its
  answer, mechanism (one of `MECHANISMS`), split (`"train"`: the model saw this question; `"heldout"`:
  it did not), and where there is one the entity, the intermediate concept and the attribute asked for.
  `fact.prompt` is exactly what `attribute` / `intervene` take for this world (chat template included).
- `planted_groups() -> {group: {attribute: answer}}`, `planted_members() -> {entity: group}`.
- `GROUND_TRUTH`: for each mechanism, which concept the model should compute, where, and from what.
- `land_latents(model, transcoders, facts=None, min_explained=0.5) -> {land: [(layer, position, latent)]}`:
  the latents that code for each land, found by contrasting prompts (no label but the land); setting them
  to another land's values (`intervene`) swaps the answer (rates in the README's planted-world table).

The world (all names invented, so no reader's knowledge of real places gets in the way):

- 24 towns with two-word names ("North Haven") in 8 lands, 3 towns per land; no single word of a
  town's name tells its land (each land's towns share no word), so the land must be *computed* from
  the pair, by an MLP, not read off one embedding (the embeddings are random and frozen, too). Each land
  has 6 attributes (capital, language, colour, animal, fruit, sport).
- `single_hop`: "Which land is North Haven in?" -> the land. `group_attribute`: "What is the fruit of
  Borea?" -> the fruit. `two_hop`: "What is the fruit of the land with North Haven?" -> the land's fruit;
  5 of each town's 6 attributes are asked during training, the sixth (a different one for each town of
  a land) is held out, so a held-out composed question can only be answered through the land. Answers
  are one word with its leading space (" Borea"), after the model's turn starts with `RESPONSE` ("Answer:").
- `opposite`: 12 antonym pairs (both ways) under 4 templates; the last template is held out.
- `copy`: "My name is Zed. What is my name?" -> "Zed"; 8 of the 24 names are never copied in training.

The recipe that made the shipped files is `python -m part3_attribution_graphs.tools.train_planted`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from jaxtyping import Int
from sae_lens import HookedSAETransformer, JumpReLUSkipTranscoder
from safetensors.torch import load_file
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from .gemma import format_prompt
from .synthetic import WorldSpec, _config, new_skip_transcoder
from .toy import make_word_tokenizer

__all__ = [
    "MECHANISMS",
    "ATTRIBUTES",
    "GROUND_TRUTH",
    "PLANTED_SPEC",
    "PlantedFact",
    "planted_facts",
    "planted_groups",
    "planted_members",
    "planted_words",
    "make_planted_tokenizer",
    "load_planted_world",
    "build_planted_model",
    "RESPONSE",
    "planted_data_dir",
    "planted_accuracy",
    "is_planted_model",
    "example_corpus",
    "LatentSet",
    "latent_activations",
    "land_latents",
]

TOKENIZER_NAME = "planted-world-g3"  # no "gemma" in it: TransformerLens special-cases that name
MECHANISMS = ("single_hop", "group_attribute", "two_hop", "opposite", "copy")

PLANTED_SPEC = WorldSpec(
    n_layers=4,
    d_model=64,
    n_heads=4,
    n_kv_heads=2,
    d_head=16,
    d_mlp=256,
    d_sae=256,
    target_l0=0,  # trained transcoders: L0 is what the sparsity penalty leaves (see the metadata)
    attn_types=("local", "global", "local", "global"),
    window_size=16,
    n_ctx=64,
    model_name="planted-g3",
)

LANDS = ("Avalon", "Borea", "Caldor", "Dunmar", "Elvia", "Fenwick", "Galen", "Harrow")
ATTRIBUTES = ("capital", "language", "colour", "animal", "fruit", "sport")
_ANSWERS = {
    "capital": ("Ashford", "Brill", "Corvin", "Delmont", "Eston", "Farrow", "Glenn", "Hollis"),
    "language": ("Alvish", "Bortic", "Celdic", "Dunnish", "Elvan", "Fennic", "Galic", "Harric"),
    "colour": ("red", "blue", "green", "gold", "white", "black", "purple", "orange"),
    "animal": ("wolf", "bear", "fox", "hawk", "deer", "lion", "owl", "seal"),
    "fruit": ("apple", "pear", "plum", "fig", "lemon", "grape", "cherry", "melon"),
    "sport": ("chess", "polo", "golf", "rugby", "tennis", "hockey", "cricket", "rowing"),
}
TOWN_FIRST = ("North", "South", "East", "West", "Upper", "Lower")
TOWN_SECOND = ("Haven", "Field", "Ford", "Bridge")
OPPOSITES = (
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("light", "dark"),
    ("happy", "sad"),
    ("early", "late"),
    ("hard", "soft"),
    ("rich", "poor"),
    ("wet", "dry"),
    ("high", "low"),
    ("full", "empty"),
)
NAMES = (
    "Zed", "Kai", "Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo",
    "Kim", "Lou", "Max", "Ned", "Oz", "Pam", "Quin", "Rex", "Sue", "Tom", "Uma", "Val",
)  # fmt: skip
N_HELDOUT_NAMES = 8  # the last 8 names are never copied in training

RESPONSE = "Answer:"  # the model's turn starts so, and every answer is one word with its leading space
SINGLE_HOP = "Which land is {town} in?"
GROUP_ATTRIBUTE = "What is the {attribute} of {land}?"
TWO_HOP = "What is the {attribute} of the land with {town}?"
OPPOSITE_TEMPLATES = (
    "What is the opposite of {word}?",
    "Give the opposite of {word}.",
    "Find the opposite of {word}.",
    "Say the opposite of {word}.",  # held out
)
COPY = "My name is {name}. What is my name?"
GREETING = "Say hi to {name}."  # a line that trains every name's embedding, without copying it

# Which concept each mechanism computes, where and from what: as planted, and where the shipped model was
# measured to do it (residual-stream and MLP-output patching, tools/ground_truth.py and the README).
GROUND_TRUTH = {
    "single_hop": "the land, computed from both words of the town (no single word tells it): layer 0's "
    "attention brings the two words to the last position, MLPs 0-1 there compute the land (patching B's MLP "
    "0+1 outputs at the last position gives B's land), later layers write it out",
    "group_attribute": "the land's attribute, looked up at the last position from the land's name (moved "
    "there by attention) and the attribute word",
    "two_hop": "town -> land -> attribute: the land is computed at the last position as in single_hop (MLPs "
    "0-1), then the attribute is looked up from it in MLPs 2-3; held-out questions can only be answered that "
    "way. The land is a distributed code over latents shared between lands, not one latent per land",
    "opposite": "the antonym, computed from the word (moved by attention to the last position) and the "
    "relation 'opposite', whatever the template",
    "copy": "the token after 'My name is', copied by attention to the last position; works for names never "
    "copied in training (the embedding is random and frozen, and copying was trained on every other token)",
}


@dataclass(frozen=True)
class PlantedFact:
    """One planted question: `prompt` (chat template included) and the `answer` token's string."""

    prompt: str
    answer: str
    mechanism: str
    split: str  # "train" | "heldout"
    entity: str | None = None  # the town, land, word or name the question is about
    intermediate: str | None = None  # the concept the mechanism passes through (two_hop: the land)
    attribute: str | None = None  # "capital", ..., "land" (single_hop), "opposite", "name"


def _prompt(user: str) -> str:
    return format_prompt(user, RESPONSE)


def planted_groups() -> dict[str, dict[str, str]]:
    """`{land: {attribute: answer}}` for the 8 lands and 6 attributes (answers with their leading space)."""
    return {land: {a: " " + _ANSWERS[a][i] for a in ATTRIBUTES} for i, land in enumerate(LANDS)}


@cache
def _membership() -> tuple[tuple[str, str], ...]:
    """`((town, land), ...)`: 3 towns per land, no two of a land's towns sharing a word (seeded draw)."""
    rng = random.Random(1234)
    cells = [(i, j) for i in range(len(TOWN_FIRST)) for j in range(len(TOWN_SECOND))]
    while True:
        rng.shuffle(cells)
        groups = [cells[3 * g : 3 * g + 3] for g in range(len(LANDS))]
        if all(len({i for i, _ in g}) == 3 and len({j for _, j in g}) == 3 for g in groups):
            break
    pairs = [
        (f"{TOWN_FIRST[i]} {TOWN_SECOND[j]}", LANDS[g]) for g, group in enumerate(groups) for i, j in group
    ]
    return tuple(sorted(pairs, key=lambda p: (TOWN_FIRST.index(p[0].split()[0]), p[0])))


def planted_members() -> dict[str, str]:
    """`{town: land}` for the 24 towns."""
    return dict(_membership())


def _two_hop_heldout(town_index: int) -> set[str]:
    """The attributes whose composed question is held out for this town: 1 of 6, rotating by town."""
    return {ATTRIBUTES[town_index % len(ATTRIBUTES)]}


@cache
def _all_facts() -> tuple[PlantedFact, ...]:
    facts: list[PlantedFact] = []
    groups, members = planted_groups(), planted_members()
    for town, land in members.items():
        facts.append(
            PlantedFact(
                _prompt(SINGLE_HOP.format(town=town)), " " + land, "single_hop", "train", town, land, "land"
            )
        )
    for land, attrs in groups.items():
        for attribute, answer in attrs.items():
            user = GROUP_ATTRIBUTE.format(attribute=attribute, land=land)
            facts.append(
                PlantedFact(_prompt(user), answer, "group_attribute", "train", land, None, attribute)
            )
    for t, (town, land) in enumerate(members.items()):
        held = _two_hop_heldout(t)
        for attribute in ATTRIBUTES:
            user = TWO_HOP.format(attribute=attribute, town=town)
            split = "heldout" if attribute in held else "train"
            facts.append(
                PlantedFact(_prompt(user), groups[land][attribute], "two_hop", split, town, land, attribute)
            )
    for k, template in enumerate(OPPOSITE_TEMPLATES):
        split = "heldout" if k == len(OPPOSITE_TEMPLATES) - 1 else "train"
        for a, b in OPPOSITES:
            for word, answer in ((a, b), (b, a)):
                user = template.format(word=word)
                facts.append(
                    PlantedFact(_prompt(user), " " + answer, "opposite", split, word, None, "opposite")
                )
    for n, name in enumerate(NAMES):
        split = "heldout" if n >= len(NAMES) - N_HELDOUT_NAMES else "train"
        facts.append(
            PlantedFact(_prompt(COPY.format(name=name)), " " + name, "copy", split, name, None, "name")
        )
    return tuple(facts)


def planted_facts(mechanism: str | None = None, split: str | None = None) -> list[PlantedFact]:
    """The planted questions, optionally only one mechanism (`MECHANISMS`) and/or split."""
    if mechanism is not None and mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS} or None, not {mechanism!r}.")
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be 'train', 'heldout' or None, not {split!r}.")
    return [
        f
        for f in _all_facts()
        if (mechanism is None or f.mechanism == mechanism) and (split is None or f.split == split)
    ]


def planted_words() -> list[str]:
    """Every word of the world's vocabulary, in the order the tokenizer numbers them."""
    templates = (RESPONSE, SINGLE_HOP, GROUP_ATTRIBUTE, TWO_HOP, *OPPOSITE_TEMPLATES, COPY, GREETING)
    words = ["user", "model"] + re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", "", " ".join(templates)))
    words += list(LANDS) + list(ATTRIBUTES) + [w for a in ATTRIBUTES for w in _ANSWERS[a]]
    words += list(TOWN_FIRST) + list(TOWN_SECOND) + [w for pair in OPPOSITES for w in pair] + list(NAMES)
    return list(dict.fromkeys(words))


def make_planted_tokenizer() -> PreTrainedTokenizerFast:
    """The world's word-level tokenizer (chat-template markers are single special tokens)."""
    return make_word_tokenizer(planted_words(), TOKENIZER_NAME)


def planted_data_dir() -> Path:
    """The package folder holding the shipped weights (`model.safetensors`, `transcoders.safetensors`,
    `meta.json`)."""
    return Path(str(resources.files("part3_attribution_graphs.worlds") / "planted_data"))


def load_planted_world(
    device: str = "cpu", data_dir: str | Path | None = None
) -> tuple[HookedSAETransformer, dict[int, JumpReLUSkipTranscoder]]:
    """The trained planted model and its trained JumpReLU skip transcoders, read from the shipped files.

    Args:
        device: where model and transcoders live.
        data_dir: another folder written by `tools.train_planted` (default: the shipped one).

    Returns:
        `(model, transcoders)` as `make_toy_world` returns them, transcoders keyed by layer.
    """
    folder = Path(data_dir) if data_dir is not None else planted_data_dir()
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{folder} has no model.safetensors: the planted world's files are missing. Rebuild them with "
            "`python -m part3_attribution_graphs.tools.train_planted`."
        )
    meta = json.loads((folder / "meta.json").read_text())
    tokenizer = make_planted_tokenizer()
    if meta["vocab_size"] != len(tokenizer):
        raise ValueError(
            f"{folder} was trained with a {meta['vocab_size']}-token vocabulary, but this package's world "
            f"has {len(tokenizer)}: retrain with `python -m part3_attribution_graphs.tools.train_planted`."
        )
    model = build_planted_model(tokenizer, device)
    state = load_file(str(folder / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = {name for name, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise ValueError(f"{folder}/model.safetensors does not fit the planted world's shape: retrain it.")
    model.eval()
    tc_state = load_file(str(folder / "transcoders.safetensors"), device=str(device))
    transcoders = {}
    for layer in range(PLANTED_SPEC.n_layers):
        tc = new_skip_transcoder(
            layer, PLANTED_SPEC.d_model, PLANTED_SPEC.d_sae, PLANTED_SPEC.model_name, device
        )
        tc.load_state_dict({k.split(".", 1)[1]: v for k, v in tc_state.items() if k.startswith(f"{layer}.")})
        transcoders[layer] = tc.eval()
    return model, transcoders


def build_planted_model(tokenizer: PreTrainedTokenizerFast, device: str = "cpu") -> HookedSAETransformer:
    """An untrained model of the planted world's shape (weights uninitialised: load or train them)."""
    model = HookedSAETransformer(_config(PLANTED_SPEC, len(tokenizer), device), tokenizer=tokenizer)
    model.set_use_hook_mlp_in(True)
    return model


@torch.no_grad()
def planted_accuracy(model: HookedSAETransformer, facts: list[PlantedFact] | None = None) -> dict[str, float]:
    """Top-1 accuracy per mechanism and split, `{"two_hop/heldout": 0.97, ...}` (splits without prompts left
    out)."""
    facts = planted_facts() if facts is None else facts
    hits: dict[str, list[int]] = {}
    by_len: dict[int, list[PlantedFact]] = {}
    for f in facts:  # prompts of one length run as one batch
        by_len.setdefault(len(model.to_str_tokens(f.prompt)), []).append(f)
    for group in by_len.values():
        top = model(model.to_tokens([f.prompt for f in group]))[:, -1].argmax(-1).tolist()
        for f, t in zip(group, top):
            hits.setdefault(f"{f.mechanism}/{f.split}", []).append(int(t == model.to_single_token(f.answer)))
    keys = [f"{m}/{s}" for m in MECHANISMS for s in ("train", "heldout")]
    return {k: round(sum(hits[k]) / len(hits[k]), 4) for k in keys if k in hits}


def is_planted_model(model: HookedSAETransformer) -> bool:
    """Whether `model` is the planted world's (by its tokenizer)."""
    return getattr(model.tokenizer, "name_or_path", None) == TOKENIZER_NAME


def example_corpus() -> Int[Tensor, "n_seq seq"]:
    """The world's own text as token ids, one conversation per row after `<bos>`, right-padded with `<pad>`:
    every planted question with its answer and `<end_of_turn>`, greetings with every name, and copy
    questions about other words. The feature dashboard's example data for this world is read from it."""
    tok = make_planted_tokenizer()
    texts = [f.prompt + f.answer + "<end_of_turn>" for f in planted_facts()]
    texts += [format_prompt(GREETING.format(name=n)) for n in NAMES]
    texts += [
        format_prompt(COPY.format(name=w), RESPONSE) + " " + w + "<end_of_turn>"
        for w in planted_words()
        if w[0].isupper() and w not in NAMES
    ]
    ids = [tok(t).input_ids for t in texts]
    width = max(len(i) for i in ids)
    return torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])


LatentSet = list[tuple[int, int, int]]  # (layer, position, latent)


@torch.no_grad()
def latent_activations(
    model: HookedSAETransformer, transcoders: dict[int, JumpReLUSkipTranscoder], prompts: list[str]
) -> dict[int, Tensor]:
    """`{layer: (n_prompts, seq, d_sae)}` latent activations (prompts of one length)."""
    names = [tc.cfg.metadata.hook_name for tc in transcoders.values()]
    _, cache = model.run_with_cache(model.to_tokens(prompts), names_filter=lambda n: n in names)
    return {layer: tc.encode(cache[tc.cfg.metadata.hook_name]) for layer, tc in transcoders.items()}


def land_latents(
    model: HookedSAETransformer,
    transcoders: dict[int, JumpReLUSkipTranscoder],
    facts: list[PlantedFact] | None = None,
    min_in: float = 0.6,
    min_explained: float = 0.5,
) -> dict[str, LatentSet]:
    """`{land: [(layer, position, latent), ...]}`: the latents that code for the land, by contrast of prompts.

    A latent at (layer, position) codes for the land when the land explains at least `min_explained` of
    the variance of its activation over `facts` (between-land over total sum of squares); it belongs to
    each land on whose prompts it fires at least `min_in` of the time. A land can be coded by latents
    shared with other lands (a code, not one latent per land), so a latent can belong to several.
    `facts` (default: the two-hop questions) must share one template (same length), so that a position
    means the same word in each. At `min_explained=0.5` setting these latents to another land's values swaps
    the answer in most held-out two-hop prompts, at 0.3 in nearly all (the README's planted-world table).
    """
    facts = planted_facts("two_hop") if facts is None else facts
    acts = latent_activations(model, transcoders, [f.prompt for f in facts])
    lands = sorted({f.intermediate for f in facts})
    onehot = torch.nn.functional.one_hot(torch.tensor([lands.index(f.intermediate) for f in facts])).float()
    out: dict[str, LatentSet] = {land: [] for land in lands}
    for layer, a in acts.items():
        a = a.float()  # (n, seq, d_sae)
        means = torch.einsum("ng,nsf->gsf", onehot, a) / onehot.sum(0)[:, None, None]
        total = ((a - a.mean(0)) ** 2).sum(0)
        between = (onehot.sum(0)[:, None, None] * (means - a.mean(0)) ** 2).sum(0)
        # Positions every prompt shares (the chat template) leave a latent constant: no variance to explain.
        varies = total > 1e-6 * (a**2).sum(0).clamp(min=1e-12)
        coding = (between >= min_explained * total) & varies
        rate = torch.einsum("ng,nsf->gsf", onehot, (a > 0).float()) / onehot.sum(0)[:, None, None]
        for g, land in enumerate(lands):
            out[land] += [(layer, pos, f) for pos, f in (coding & (rate[g] >= min_in)).nonzero().tolist()]
    return out
