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
- `land_latents(model, transcoders, facts=None) -> {land: [(layer, position, latent)]}`: the latents
  selective for each land by a fixed rule on *training* prompts only (fires on >= `MIN_IN` of the land's
  prompts, <= `MAX_OUT` of the others'); `LAND_SITE` is where the recipe plants the land (layer 0, the
  town). Setting them to another land's values swaps the answer (rates in the README's planted-world table).

The world (all names invented, so no reader's knowledge of real places gets in the way):

- 24 one-word towns (`TOWNS`) in 8 lands, 3 towns per land. Each land has 6 attributes (capital, language,
  colour, animal, fruit, sport). Every town question names the town first, as its own sentence, at
  `TOWN_POSN`: the land is formed there (by MLP 0) and moved to the answer by attention.
- `single_hop`: "Ambry. Which land is it in?" -> the land. `group_attribute`: "What is the fruit of Borea?"
  -> the fruit. `two_hop`: "Ambry. What is the fruit of its land?" -> the land's fruit. Each town holds out
  one composed question, and a land's three towns hold out three *different* attributes (`_two_hop_heldout`),
  so a held-out question can only be answered through the land, whose attribute the model learnt from its
  other towns. Answers are one word with its leading space (" Borea"), after the model's turn starts with
  `RESPONSE` ("Answer:"). A two-hop answer's embedding shares a part with its land's other answers and a
  part with the other lands' answers to the same attribute (`tools/train_planted.ANSWER_PARTS`).
- `opposite`: 12 antonym pairs (both ways) under 4 templates; the last template is held out.
- `copy`: "My name is Zed. What is my name?" -> "Zed"; 8 of the 24 names are never copied in training.

Words outside the vocabulary ("Paris", a town in lower case) raise `UnknownWordError` naming them.
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

from ..guard import guarded
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
    "PlantedTokenizer",
    "UnknownWordError",
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
TOWNS = (
    "Ambry", "Brisk", "Cindle", "Dorrow", "Emmer", "Fallow", "Gorse", "Heddle", "Inkle", "Jessop", "Kittle",
    "Larch", "Mottle", "Nettle", "Orrick", "Pimble", "Quill", "Rundle", "Sallow", "Tansy", "Umber", "Vetch",
    "Wicker", "Yarrow",
)  # fmt: skip
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
SINGLE_HOP = "{town}. Which land is it in?"
GROUP_ATTRIBUTE = "What is the {attribute} of {land}?"
TWO_HOP = "{town}. What is the {attribute} of its land?"
LAND_LINE = "{town} is in {land}."  # corpus text: a line per town stating its land
TOWN_POSN = 4  # every single- and two-hop prompt names its town first, right after the chat template
LAND_SITE = (0, TOWN_POSN)  # where the recipe makes the land: MLP 0 at the town (layer, position)
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
    "single_hop": "the land, formed at the town's own position by MLP 0 (LAND_SITE) and moved to the last "
    "position by attention, which writes it out",
    "group_attribute": "the land's attribute, looked up at the last position from the land's name (moved "
    "there by attention) and the attribute word",
    "two_hop": "town -> land -> attribute: MLP 0 writes the land at the town (LAND_SITE: a few land latents "
    "there), attention moves it to the last position and adds it to the attribute read from the question; "
    "the answer is the word whose embedding shares both (each answer's embedding holds a part of its "
    "land's and a part of its attribute's); held-out questions can only be answered that way",
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
    """`((town, land), ...)`: 3 towns per land (seeded draw), in `TOWNS` order."""
    towns = list(TOWNS)
    random.Random(1234).shuffle(towns)
    land_of = {town: LANDS[k // 3] for k, town in enumerate(towns)}
    return tuple((town, land_of[town]) for town in TOWNS)


def planted_members() -> dict[str, str]:
    """`{town: land}` for the 24 towns."""
    return dict(_membership())


def _two_hop_heldout(town: str) -> str:
    """The attribute whose composed question is held out for this town: the j-th town of land g holds out
    attribute (g + 2j) mod 6, so a land's three towns hold out three different attributes (and the held-out
    question can only be answered through the land, whose attribute the model learnt from its other towns)."""
    members = planted_members()
    land = members[town]
    j = [t for t, g in members.items() if g == land].index(town)
    return ATTRIBUTES[(LANDS.index(land) + 2 * j) % len(ATTRIBUTES)]


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
    for town, land in members.items():
        held = _two_hop_heldout(town)
        for attribute in ATTRIBUTES:
            user = TWO_HOP.format(attribute=attribute, town=town)
            split = "heldout" if attribute == held else "train"
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
    templates = (
        RESPONSE,
        SINGLE_HOP,
        GROUP_ATTRIBUTE,
        TWO_HOP,
        LAND_LINE,
        *OPPOSITE_TEMPLATES,
        COPY,
        GREETING,
    )
    words = ["user", "model"] + re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", "", " ".join(templates)))
    words += list(LANDS) + list(ATTRIBUTES) + [w for a in ATTRIBUTES for w in _ANSWERS[a]]
    words += list(TOWNS) + [w for pair in OPPOSITES for w in pair] + list(NAMES)
    return list(dict.fromkeys(words))


class UnknownWordError(ValueError):
    """Text holds a word the planted world's vocabulary does not have."""


class PlantedTokenizer(PreTrainedTokenizerFast):
    """A word-level tokenizer that refuses unknown words instead of turning them into `<unk>` silently."""

    # Every encode goes through `_batch_encode_plus` in transformers 4 and through `_encode_plus` in 5 (which
    # dropped the batch method); each version's one route is checked, once.
    _BATCH_ROUTE = hasattr(PreTrainedTokenizerFast, "_batch_encode_plus")

    def _batch_encode_plus(self, batch_text_or_text_pairs, *args, **kwargs):
        out = super()._batch_encode_plus(batch_text_or_text_pairs, *args, **kwargs)
        self._refuse_unknown(batch_text_or_text_pairs, out)
        return out

    def _encode_plus(self, text, *args, **kwargs):
        out = super()._encode_plus(text, *args, **kwargs)
        if not self._BATCH_ROUTE:
            self._refuse_unknown([text] if isinstance(text, str) else text, out)
        return out

    def _refuse_unknown(self, texts, out) -> None:
        unknown: list[str] = []
        for text, enc in zip(texts, out.encodings or []):
            if isinstance(text, str):
                unknown += [
                    text[a:b].strip() for i, (a, b) in zip(enc.ids, enc.offsets) if i == self.unk_token_id
                ]
        if unknown:
            words = ", ".join(repr(w) for w in dict.fromkeys(unknown))
            raise UnknownWordError(
                f"The planted world has no word {words}: its vocabulary is its own invented names "
                f"(towns such as {TOWNS[0]!r}, capitalised; lands such as {LANDS[0]!r}) and the words of its "
                "templates. Use words from `planted_words()`, or `planted_facts()` for its prompts."
            )


def make_planted_tokenizer() -> PreTrainedTokenizerFast:
    """The world's word-level tokenizer (chat-template markers are single special tokens; an unknown word
    raises `UnknownWordError` naming it)."""
    return make_word_tokenizer(planted_words(), TOKENIZER_NAME, PlantedTokenizer)


def planted_data_dir() -> Path:
    """The package folder holding the shipped weights (`model.safetensors`, `transcoders.safetensors`,
    `meta.json`)."""
    return Path(str(resources.files("part3_attribution_graphs.worlds") / "planted_data"))


MAX_LOAD_FVU = 0.5  # a transcoder that leaves more of its layer's MLP unexplained was not trained on it


class PlantedFileError(ValueError):
    """A planted world file is missing, truncated, corrupt or does not fit the world."""


def _read_tensors(path: Path, device: str) -> dict[str, Tensor]:
    """A safetensors file's tensors, every one finite; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the planted world's files are incomplete. Rebuild them with "
            "`python -m part3_attribution_graphs.tools.train_planted`."
        )
    try:
        state = load_file(str(path), device=str(device))
    except Exception as err:  # safetensors' own errors name no file
        raise PlantedFileError(
            f"{path} cannot be read ({type(err).__name__}: {err}): it is truncated or corrupt. Rebuild it "
            "with `python -m part3_attribution_graphs.tools.train_planted`."
        ) from None
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise PlantedFileError(f"{path} holds NaN or inf values in {bad[:5]}: rebuild it with train_planted.")
    return state


def _read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: rebuild the planted world with train_planted.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlantedFileError(f"{path} is not valid JSON ({err}): rebuild it with train_planted.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
        raise PlantedFileError(f"{path} has no vocab_size: it is not a planted world's meta.json.")
    return meta


@torch.no_grad()
def _check_layers(
    model: HookedSAETransformer, transcoders: dict[int, JumpReLUSkipTranscoder], folder: Path
) -> None:
    """Each transcoder must reconstruct its own layer's MLP on the world's prompts: layers stored in the wrong
    order, or a model and transcoders from different runs, fail here."""
    tokens = model.to_tokens([f.prompt for f in planted_facts("two_hop")[:12]])
    names = [f"blocks.{layer}.{h}" for layer in transcoders for h in ("mlp.hook_in", "hook_mlp_out")]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    for layer, tc in transcoders.items():
        y = cache[f"blocks.{layer}.hook_mlp_out"][:, 1:]
        out = tc(cache[f"blocks.{layer}.mlp.hook_in"][:, 1:])
        fvu = float(((out - y) ** 2).sum() / ((y - y.mean((0, 1))) ** 2).sum())
        if not fvu < MAX_LOAD_FVU:
            raise PlantedFileError(
                f"{folder / 'transcoders.safetensors'}: the transcoder stored for layer {layer} does not "
                f"fit layer {layer}'s MLP (it leaves {fvu:.0%} of its output unexplained): layers stored in "
                "the wrong order, or files from different runs. Rebuild them together with train_planted."
            )


def load_planted_world(
    device: str = "cpu", data_dir: str | Path | None = None
) -> tuple[HookedSAETransformer, dict[int, JumpReLUSkipTranscoder]]:
    """The trained planted model and its trained JumpReLU transcoders, read from the shipped files.

    Every file is checked: readable (a truncated or corrupt one is named), finite, of the world's shape, and
    each transcoder fits its own layer's MLP (layers in order).

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
    meta = _read_meta(folder)
    tokenizer = make_planted_tokenizer()
    if meta["vocab_size"] != len(tokenizer):
        raise ValueError(
            f"{folder} was trained with a {meta['vocab_size']}-token vocabulary, but this package's world "
            f"has {len(tokenizer)}: retrain with `python -m part3_attribution_graphs.tools.train_planted`."
        )
    model = build_planted_model(tokenizer, device)
    state = _read_tensors(folder / "model.safetensors", device)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:
        missing, unexpected = [], ["(a tensor of the wrong shape)"]
    params = {name for name, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise PlantedFileError(
            f"{folder}/model.safetensors does not fit the planted world's shape: retrain it."
        )
    model.eval()
    tc_state = _read_tensors(folder / "transcoders.safetensors", device)
    transcoders = {}
    for layer in range(PLANTED_SPEC.n_layers):
        tc = new_skip_transcoder(
            layer, PLANTED_SPEC.d_model, PLANTED_SPEC.d_sae, PLANTED_SPEC.model_name, device
        )
        try:
            tc.load_state_dict(
                {k.split(".", 1)[1]: v for k, v in tc_state.items() if k.startswith(f"{layer}.")}
            )
        except RuntimeError as err:
            raise PlantedFileError(
                f"{folder}/transcoders.safetensors has no complete transcoder for layer {layer} ({err}): "
                "retrain it."
            ) from None
        transcoders[layer] = tc.eval()
    _check_layers(model, transcoders, folder)
    return model, transcoders


def build_planted_model(tokenizer: PreTrainedTokenizerFast, device: str = "cpu") -> HookedSAETransformer:
    """An untrained model of the planted world's shape (weights uninitialised: load or train them)."""
    model = HookedSAETransformer(_config(PLANTED_SPEC, len(tokenizer), device), tokenizer=tokenizer)
    model.set_use_hook_mlp_in(True)
    return model


def _check_planted_model(model: HookedSAETransformer) -> None:
    if not is_planted_model(model):
        raise ValueError(
            "This function reads the planted world's facts, but the model is another world's (its "
            f"tokenizer is {getattr(model.tokenizer, 'name_or_path', None)!r}): pass the model of "
            "`load_planted_world()`."
        )


def _check_facts(name: str, facts: object, one_template: bool = False, lands: bool = False) -> None:
    if facts is None:
        return
    if (
        not isinstance(facts, (list, tuple))
        or not all(isinstance(f, PlantedFact) for f in facts)
        or not facts
    ):
        raise TypeError(f"{name} must be a non-empty list of PlantedFact (from planted_facts()), or None.")
    if lands and any(f.intermediate is None for f in facts):
        raise ValueError(
            f"{name} must be questions about towns (each with its land), e.g. planted_facts('two_hop')."
        )
    if one_template and len({len(make_planted_tokenizer()(f.prompt).input_ids) for f in facts}) > 1:
        raise ValueError(
            f"{name} mixes templates (prompts of different lengths), so a position means different words: "
            "pass one mechanism's questions, e.g. planted_facts('two_hop')."
        )


def _accuracy_args(args: dict) -> None:
    _check_planted_model(args["model"])
    _check_facts("facts", args["facts"])


@guarded(model="model", check=_accuracy_args)
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
    every planted question with its answer and `<end_of_turn>`, the line per town stating its land (as in
    training: without it a town's land is named only in its one single-hop answer), greetings with every
    name, and copy questions about other words. The feature dashboard's example data for this world is read
    from it."""
    tok = make_planted_tokenizer()
    texts = [f.prompt + f.answer + "<end_of_turn>" for f in planted_facts()]
    texts += [format_prompt(LAND_LINE.format(town=t, land=g)) for t, g in planted_members().items()]
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


def _activation_args(args: dict) -> None:
    prompts = args["prompts"]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(
            "prompts must be a non-empty list of prompt strings (e.g. [f.prompt for f in facts])."
        )
    tok = args["model"].tokenizer
    if len({len(tok(p).input_ids) for p in prompts}) > 1:
        raise ValueError(
            "prompts must all have the same number of tokens (one template), to run as one batch."
        )


@guarded(model="model", transcoders="transcoders", check=_activation_args)
@torch.no_grad()
def latent_activations(
    model: HookedSAETransformer, transcoders: dict[int, JumpReLUSkipTranscoder], prompts: list[str]
) -> dict[int, Tensor]:
    """`{layer: (n_prompts, seq, d_sae)}` latent activations (prompts of one length)."""
    names = [tc.cfg.metadata.hook_name for tc in transcoders.values()]
    _, cache = model.run_with_cache(model.to_tokens(prompts), names_filter=lambda n: n in names)
    return {layer: tc.encode(cache[tc.cfg.metadata.hook_name]) for layer, tc in transcoders.items()}


MIN_IN = 0.5  # a land latent fires on at least half of its land's training prompts ...
MAX_OUT = 0.1  # ... and on at most a tenth of the other lands' training prompts


def _land_args(args: dict) -> None:
    _check_planted_model(args["model"])
    _check_facts("facts", args["facts"], one_template=True, lands=True)
    for name in ("min_in", "max_out"):
        if not 0.0 <= args[name] <= 1.0:
            raise ValueError(f"{name} is a share of prompts, between 0 and 1, not {args[name]!r}.")


@guarded(model="model", transcoders="transcoders", reals=("min_in", "max_out"), check=_land_args)
def land_latents(
    model: HookedSAETransformer,
    transcoders: dict[int, JumpReLUSkipTranscoder],
    facts: list[PlantedFact] | None = None,
    min_in: float = MIN_IN,
    max_out: float = MAX_OUT,
) -> dict[str, LatentSet]:
    """`{land: [(layer, position, latent), ...]}`: the latents selective for each land, on training prompts.

    The rule, fixed before any intervention: a latent at (layer, position) is a land's when it fires on at
    least `min_in` of that land's *training* prompts among `facts` and on at most `max_out` of the other
    lands' training prompts. Held-out prompts in `facts` are ignored, so the latents are never chosen by the
    questions they are then tested on. `facts` (default: the two-hop questions) must share one template (one
    length), so that a position means the same word in each.
    """
    facts = planted_facts("two_hop") if facts is None else facts
    train = [f for f in facts if f.split == "train" and f.intermediate is not None]
    if not train:
        raise ValueError("land_latents needs training prompts about towns (e.g. planted_facts('two_hop')).")
    acts = latent_activations(model, transcoders, [f.prompt for f in train])
    lands = sorted({f.intermediate for f in train})
    out: dict[str, LatentSet] = {land: [] for land in lands}
    for layer, a in acts.items():
        fired = (a > 0).float()  # (n, seq, d_sae)
        for land in lands:
            mine = torch.tensor([f.intermediate == land for f in train])
            selective = (fired[mine].mean(0) >= min_in) & (fired[~mine].mean(0) <= max_out)
            out[land] += [(layer, pos, k) for pos, k in selective.nonzero().tolist()]
    return out
