"""The planted world's recipe: train the model on its planted facts, then its transcoders on activations.

`python -m part3_attribution_graphs.tools.train_planted [--out DIR] [--force] [--seed 2]` writes
`model.safetensors`, `transcoders.safetensors` and `meta.json` (vocabulary size, shape, training
settings and statistics) into `DIR` (default: the package's `worlds/planted_data/`) the way the CLI
writes (`staging.OutputFolder`): staged, moved in together, the folder's other files left alone, and a
file of the same name that the recipe did not write replaced only with `--force`. Seeded: the same seed
on the same machine gives the same bits; the shipped world is seed 2 (`SHIPPED_SEED`).

1. **The model** (Gemma 3's architecture at `planted.PLANTED_SPEC`, tied embeddings as Gemma's) learns
   the training split of `planted_facts()` plus corpus-only lines: a line per town stating its land ("Ambry
   is in Harrow."), every name in a greeting ("Say hi to Oz.") so held-out names have trained embeddings,
   and copy questions with a distractor name before them. The loss is the answer token's cross-entropy plus
   a small weight on every other token of the user's turn (next-word prediction, which trains the
   embeddings of words that are never answers). AdamW, weight decay on the matrices. What plants the land at
   the town (`planted.LAND_SITE`): in town examples, MLPs 1-3 are dropped at the town (`P_DROP`), layer 0's
   residual there is rebuilt around MLP 0's output from a random town's (`SWAPS`: the answer follows MLP 0's
   output, never the town's token itself), and MLP 0's output at the town is pulled toward its land's mean
   (`LAND_WEIGHT`). The two-hop answers' frozen embeddings share a land part and an attribute part
   (`ANSWER_PARTS`), so that the answer is the land added to the attribute.
2. **The transcoders**: one JumpReLU transcoder per layer, trained on that layer's MLP input and output over
   the corpus (every split's text, no labels, each question's answering position `ANSWER_COPIES` extra times):
   normalised MSE plus `l0_coeff` times L0, with the straight-through (rectangle kernel) gradient for the
   thresholds. The skip is fixed at 0 (`W_skip` zeros):
   a least-squares skip writes a large town-specific term that the latents then cancel town by town, so no
   latent codes the land. A zero skip is still a skip: the files load as SAELens skip transcoders.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor

from ..arguments import real, whole_number
from ..guard import guarded
from ..progress import tqdm
from ..staging import OutputError, OutputFolder
from ..worlds import planted
from ..worlds.gemma import START_POSN, format_prompt
from ..worlds.synthetic import fit_affine_skip

__all__ = ["corpus", "train_model", "train_transcoder", "train_world", "write_world", "main"]

ANSWER_WEIGHT = 1.0  # loss weight of the answer token
TEXT_WEIGHT = 0.1  # loss weight of each other token of the user's turn
TOWN_MECHANISMS = ("single_hop", "two_hop")  # questions that name a town, at planted.TOWN_POSN
DROP_MLPS = (1, 2, 3)  # MLPs dropped at the town's position in training, so that MLP 0 forms the land there
P_DROP = 0.8  # chance that a town example runs without those MLPs at the town
# Layer 0's residual at the town is rebuilt in three ways (each with this chance, else left alone), so that
# the answer can follow only MLP 0's output there: "swap", another town's MLP 0 output (the answer becomes
# that town's, so the last position cannot read the town's token itself in layer 0); "context", this town's
# MLP 0 output (the answer stays); "sibling", the MLP 0 output of another town of the same land (the answer
# stays: MLP 0 must write the land, not the town). In "swap" and "context" the rest of the residual (the
# token and layer 0's attention) is a town's drawn at random, so that no land can be read from it: when the
# land latents are ablated, nothing else in the residual names the land.
SWAPS = {"swap": 0.4, "context": 0.5, "sibling": 0.1}
# The planted variable itself: MLP 0's output at the town is pulled toward its land's mean (this weight times
# the within-land share of its variance over the 24 towns), so that what MLP 0 writes there is the land.
LAND_WEIGHT = 1.0
# Each two-hop answer's embedding (frozen, as every embedding) is its own random direction plus a part shared
# with its land's other answers and a part shared with the other lands' answers to the same attribute, these
# weights times a unit vector each: as a real model's "Austin" lies near other Texas words and other capitals.
# The last position can then answer by adding the land it reads from the town to the attribute it reads from
# the question, and the tied unembedding picks the word that has both; the land's part is the larger, so the
# land carries more of the answer's logit than the attribute word does. With random answers the model learns
# one latent per (land, attribute) at the last position, fed directly by the attribute word, and the graph's
# strongest path ran through the attribute in half of the held-out questions.
ANSWER_PARTS = {"land": 1.5, "attribute": 0.75}
# The transcoders see the position that predicts each planted answer this many extra times: it is where the
# graph is built and where an MLP error term would otherwise hold the answer (an ablation with the errors
# held then leaves the answer in place).
ANSWER_COPIES = 3
# The seed of the shipped world. Seeds 0-3 of this recipe were each measured with tools/ground_truth (README):
# all four put the strongest path through the land in 79-92% of held-out questions, but only seed 2's land
# latents pass 80% in both the swaps and the ablations, frozen and live, so seed 2 is the one shipped.
SHIPPED_SEED = 2


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text).input_ids


class Example(NamedTuple):
    """One training sequence: token ids, the answer's position (-1: none), and for the town questions the
    town and what is asked about it (an attribute, or "land"), so that a town swap can relabel it."""

    ids: list[int]
    answer_pos: int
    town: str | None = None
    asks: str | None = None


def corpus(seed: int = 0) -> tuple[list[Example], list[list[int]]]:
    """`(training examples, transcoder text)`.

    Training examples: the train split of every mechanism, a line per town stating its land, greetings
    (no answer) and copy questions with a distractor. The transcoder text is every planted prompt with its
    answer (both splits: activations only, no labels) plus the greetings, land lines and distractor lines.
    """
    rng = random.Random(seed)
    tok = planted.make_planted_tokenizer()
    train: list[Example] = []
    for fact in planted.planted_facts(split="train"):
        ids = _encode(tok, fact.prompt + fact.answer)
        town = fact.entity if fact.mechanism in TOWN_MECHANISMS else None
        train.append(Example(ids, len(ids) - 1, town, fact.attribute if town else None))
    for town, land in planted.planted_members().items():
        ids = _encode(tok, format_prompt(planted.LAND_LINE.format(town=town, land=land)))
        train.append(Example(ids, ids.index(tok.convert_tokens_to_ids(" " + land)), town, "land"))
    for name in planted.NAMES:
        train.append(Example(_encode(tok, format_prompt(planted.GREETING.format(name=name))), -1))
    copy_names = [f.entity for f in planted.planted_facts("copy", "train")]
    for name in copy_names:
        for _ in range(3):
            other = rng.choice([n for n in planted.NAMES if n != name])
            user = planted.GREETING.format(name=other) + " " + planted.COPY.format(name=name)
            ids = _encode(tok, format_prompt(user, planted.RESPONSE) + " " + name)
            train.append(Example(ids, len(ids) - 1))
    # Copying any token but the held-out names' (the copy question with the token in the name's place), so
    # that what is learnt is copying, not a list of names.
    held = {tok.convert_tokens_to_ids(f.entity) for f in planted.planted_facts("copy", "heldout")}
    held |= {tok.convert_tokens_to_ids(" " + f.entity) for f in planted.planted_facts("copy", "heldout")}
    before, after = format_prompt(planted.COPY, planted.RESPONSE).split("{name}")
    head, tail = _encode(tok, before.rstrip(" ")), _encode(tok, after)[1:]  # tail without its <bos>
    for token in range(len(tok)):
        if token not in held and token not in tok.all_special_ids:
            train.append(Example(head + [token] + tail + [token], len(head) + len(tail) + 1))
    text = [_encode(tok, f.prompt + f.answer) for f in planted.planted_facts()]
    text += [ex.ids for ex in train if ex.answer_pos < 0 or ex.asks == "land" or len(ex.ids) > 22]
    return train, text


def _pad(seqs: list[list[int]], pad: int) -> Int[Tensor, "batch seq"]:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (n - len(s)) for s in seqs])


def _logits(model, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq d_vocab"]:
    """The model's logits with the unembedding tied to the embedding (W_U = W_E.T / sqrt(d_model))."""
    resid = model(tokens, stop_at_layer=model.cfg.n_layers)
    return model.ln_final(resid) @ model.embed.W_E.T / math.sqrt(model.cfg.d_model)


@torch.no_grad()
def _init_weights(model, gen: torch.Generator) -> None:
    """Norm weights 1 (Gemma's scale 1 + w with w = 0), no biases, fan-in scaled matrices, unit embeddings."""
    for name, p in sorted(model.named_parameters()):
        if name.endswith(".w"):
            p.fill_(1.0)
        elif name.split(".")[-1].lstrip("_").startswith("b_"):
            p.zero_()
        elif name == "embed.W_E":  # rows of norm sqrt(d_model): Gemma's embedding scale folded in
            p.normal_(generator=gen)
        else:
            fan_in = p.shape[-2] if p.ndim >= 2 else p.shape[-1]
            p.normal_(generator=gen).div_(fan_in**0.5)


@torch.no_grad()
def _share_answer_parts(model, tok, gen: torch.Generator) -> None:
    """Each two-hop answer's embedding: its own direction plus its land's and its attribute's shared parts
    (`ANSWER_PARTS`), at the embedding's norm."""
    d = model.cfg.d_model
    groups = planted.planted_groups()
    unit = torch.nn.functional.normalize
    land_part = unit(torch.randn(len(planted.LANDS), d, generator=gen), dim=1)
    attr_part = unit(torch.randn(len(planted.ATTRIBUTES), d, generator=gen), dim=1)
    W_E = model.embed.W_E
    for g, land in enumerate(planted.LANDS):
        for a, attribute in enumerate(planted.ATTRIBUTES):
            t = tok.convert_tokens_to_ids(groups[land][attribute])
            vec = unit(W_E[t], dim=0) + ANSWER_PARTS["land"] * land_part[g]
            vec = vec + ANSWER_PARTS["attribute"] * attr_part[a]
            W_E[t] = unit(vec, dim=0) * d**0.5


def train_model(
    seed: int = 0,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 2.0,
    freeze_embeddings: bool = True,
) -> tuple[object, dict]:
    """The trained planted model and its training statistics (seconds, final loss, accuracies)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tok = planted.make_planted_tokenizer()
    model = planted.build_planted_model(tok)
    _init_weights(model, gen)
    _share_answer_parts(model, tok, gen)
    train, _ = corpus(seed)
    pad = tok.pad_token_id
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.split(".")[-1].lstrip("_").startswith("b_") or name.startswith("unembed"):
            p.requires_grad_(False)  # Gemma has no biases; the unembedding is tied to the embedding
        elif name == "embed.W_E" and freeze_embeddings:
            p.requires_grad_(False)
        elif p.ndim >= 2 and name != "embed.W_E":
            decay.append(p)
        else:
            no_decay.append(p)  # norms, and the embedding (rows of held-out names must not shrink)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    start = START_POSN - 1  # the position that predicts the first word of the user's text
    relabel = _Relabel(tok)
    # The chat template's prefix and each town: layer 0's residual at the town depends on these alone.
    prefix = _encode(tok, format_prompt(""))[: planted.TOWN_POSN]
    town_tokens = torch.tensor([prefix + [tok.convert_tokens_to_ids(t)] for t in planted.TOWNS])
    members = planted.planted_members()
    land_of = torch.tensor([[float(members[t] == g) for t in planted.TOWNS] for g in planted.LANDS])
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="model", leave=False):
        idx = torch.randint(len(train), (batch_size,), generator=gen).tolist()
        batch = [train[i] for i in idx]
        tokens = _pad([ex.ids for ex in batch], pad)
        answer_pos = torch.tensor([ex.answer_pos for ex in batch])
        targets = tokens[:, 1:].clone()
        has_town = torch.tensor([ex.town is not None for ex in batch])
        drop = has_town & (torch.rand(batch_size, generator=gen) < P_DROP)
        draw = torch.rand(batch_size, generator=gen)
        modes, donors = [None] * batch_size, [0] * batch_size
        contexts = torch.randint(len(planted.TOWNS), (batch_size,), generator=gen).tolist()
        for b in has_town.nonzero().flatten().tolist():
            edge = 0.0
            for mode, chance in SWAPS.items():
                if edge <= draw[b] < edge + chance:
                    modes[b] = mode
                edge += chance
            if modes[b] in ("swap", "sibling"):  # "context" keeps the town's own MLP 0 output
                options = relabel.donors(batch[b], modes[b])
                donors[b] = options[int(torch.randint(len(options), (1,), generator=gen))]
            if modes[b] == "swap":
                targets[b, batch[b].answer_pos - 1] = relabel.answer(planted.TOWNS[donors[b]], batch[b].asks)
        resid0, mlp0 = _town_layer0(model, town_tokens)
        towns = [relabel.index[ex.town] if ex.town else -1 for ex in batch]
        hooks = _town_hooks(resid0, mlp0, towns, drop, modes, donors, contexts)
        with model.hooks(fwd_hooks=hooks):
            logits = _logits(model, tokens[:, :-1])
        land_means = land_of @ mlp0 / land_of.sum(1, keepdim=True)  # (n_lands, d_model)
        within = ((mlp0 - land_of.T @ land_means) ** 2).sum() / ((mlp0 - mlp0.mean(0)) ** 2).sum()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        pos = torch.arange(targets.shape[1])
        is_answer = pos[None] == (answer_pos[:, None] - 1)
        is_text = (pos[None] >= start) & (targets != pad) & ~is_answer
        weights = ANSWER_WEIGHT * is_answer.float() / batch_size + TEXT_WEIGHT * is_text.float() / batch_size
        loss = (ce * weights).sum() + LAND_WEIGHT * within
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():  # the unembedding becomes what training used: the tied embedding
        model.unembed.W_U.copy_(model.embed.W_E.T / math.sqrt(model.cfg.d_model))
        model.unembed.b_U.zero_()
    for p in model.parameters():
        p.requires_grad_(False)
    stats = {
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "freeze_embeddings": freeze_embeddings,
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "accuracy": planted.planted_accuracy(model),
    }
    return model, stats


class _Relabel:
    """Town swaps in training: which towns may stand in, and what the answer becomes."""

    def __init__(self, tok):
        self.tok = tok
        self.members = planted.planted_members()
        self.groups = planted.planted_groups()
        self.index = {town: k for k, town in enumerate(planted.TOWNS)}
        self.trained = {(f.entity, f.attribute) for f in planted.planted_facts("two_hop", "train")}

    def donors(self, ex: Example, mode: str) -> list[int]:
        """Towns that may stand in for this example's town. "swap": another town, never one whose question is
        held out (the swap would teach the held-out composed question itself); "sibling": another town of the
        same land."""
        land = self.members[ex.town]
        return [
            k
            for k, town in enumerate(planted.TOWNS)
            if town != ex.town
            and (mode != "swap" or ex.asks == "land" or (town, ex.asks) in self.trained)
            and (mode != "sibling" or self.members[town] == land)
        ]

    def answer(self, town: str, asks: str) -> int:
        land = self.members[town]
        word = " " + land if asks == "land" else self.groups[land][asks]
        return self.tok.convert_tokens_to_ids(word)


def _town_layer0(model, town_tokens) -> tuple[Tensor, Tensor]:
    """Layer 0's residual and MLP 0's output at the town, for every town on the chat-template prefix (what any
    town question computes there: the position sees only the prefix and the town)."""
    p = planted.TOWN_POSN
    mlp0 = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda out, hook: mlp0.append(out[:, p]))]):
        resid0 = model(town_tokens, stop_at_layer=1)[:, p]
    return resid0, mlp0[0]


def _town_hooks(
    resid0, mlp0, towns: list[int], drop, modes: list, donors: list[int], contexts: list[int]
) -> list:
    """Training-time edits at the town's position: the MLPs of `DROP_MLPS` zeroed in the rows of `drop`, and
    layer 0's residual rebuilt from every town's (`_town_layer0`) as `modes` says, the town `contexts[b]`
    giving the rest of the residual in "swap" and "context"."""
    p = planted.TOWN_POSN
    hooks = []
    rows = [b for b, mode in enumerate(modes) if mode is not None]
    if rows:
        rebuilt = []
        for b in rows:
            t, d, c = towns[b], donors[b], contexts[b]
            if modes[b] == "swap":
                rebuilt.append(resid0[c] - mlp0[c] + mlp0[d])
            elif modes[b] == "context":
                rebuilt.append(resid0[c] - mlp0[c] + mlp0[t])
            else:
                rebuilt.append(resid0[t] - mlp0[t] + mlp0[d])
        rebuilt = torch.stack(rebuilt)

        def rebuild(resid, hook):
            resid = resid.clone()
            resid[rows, p] = rebuilt.to(resid.dtype)
            return resid

        hooks.append(("blocks.0.hook_resid_post", rebuild))
    if drop.any():

        def drop_mlp(out, hook):
            keep = torch.ones(out.shape[:2] + (1,), dtype=out.dtype)
            keep[drop, p] = 0.0
            return out * keep

        hooks += [(f"blocks.{layer}.hook_mlp_out", drop_mlp) for layer in DROP_MLPS]
    return hooks


class _JumpReLU(torch.autograd.Function):
    """`pre * H(pre - theta)`, with the rectangle-kernel straight-through gradient for `theta`."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.bandwidth / 2).to(pre.dtype)
        g_theta = -(theta / ctx.bandwidth) * near * grad
        return grad * (pre > theta), g_theta.sum(0), None


class _Step(torch.autograd.Function):
    """`H(pre - theta)` (what L0 counts), with the rectangle-kernel straight-through gradient for `theta`."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.bandwidth / 2).to(pre.dtype)
        return None, (-(1 / ctx.bandwidth) * near * grad).sum(0), None


def train_transcoder(
    x: Float[Tensor, "n d"],
    y: Float[Tensor, "n d"],
    d_sae: int,
    gen: torch.Generator,
    steps: int = 1500,
    batch_size: int = 1024,
    lr: float = 5e-3,
    l0_coeff: float = 1e-2,
    bandwidth: float = 0.05,
    init_threshold: float = 0.1,
    skip: bool = False,
) -> tuple[dict[str, Tensor], dict]:
    """A JumpReLU skip transcoder `y ~ JumpReLU(x W_enc + b_enc) W_dec + b_dec + x W_skip.T`, and statistics.

    Loss: mean squared error over the variance of `y` (FVU) plus `l0_coeff` times the mean number of
    latents firing, with the L0 coefficient ramped up over the first fifth of the steps. `skip=False` (the
    planted world's): `W_skip` stays 0, so the latents carry all of the MLP's output (a least-squares skip
    writes a large town-specific term that latents then cancel town by town, and no latent codes the land).
    """
    n, d = x.shape
    W_skip, b_skip, resid = fit_affine_skip(x.double(), y.double())
    fvu_skip = float((resid.float() ** 2).sum(1).mean())
    if not skip:
        W_skip, b_skip = torch.zeros_like(W_skip), y.double().mean(0)
        resid = y.double() - b_skip
    # Decoder rows: random directions, a tenth of what the skip misses; encoder: their transposes, scaled so
    # that pre-activations are about unit size; thresholds start low, so that most latents fire at first.
    directions = torch.nn.functional.normalize(torch.randn(d_sae, d, generator=gen), dim=1)
    W_dec = directions * 0.1 * float(resid.norm(dim=1).mean())
    W_enc = directions.T * (d**0.5 / float(x.norm(dim=1).mean()))
    params = {
        "W_enc": W_enc,
        "b_enc": torch.zeros(d_sae),
        "log_threshold": torch.full((d_sae,), math.log(init_threshold)),
        "W_dec": W_dec,
        "b_dec": b_skip.float(),
        "W_skip": W_skip.float(),
    }
    params = {k: v.clone().requires_grad_(k != "W_skip" or skip) for k, v in params.items()}
    opt = torch.optim.Adam([v for v in params.values() if v.requires_grad], lr=lr, betas=(0.9, 0.999))
    var = float(((y - y.mean(0)) ** 2).sum(1).mean())

    def forward(xb):
        pre = xb @ params["W_enc"] + params["b_enc"]
        theta = params["log_threshold"].exp()
        acts = _JumpReLU.apply(pre, theta, bandwidth)
        out = acts @ params["W_dec"] + params["b_dec"] + xb @ params["W_skip"].T
        return out, _Step.apply(pre, theta, bandwidth)

    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=gen)
        out, fired = forward(x[idx])
        fvu = ((out - y[idx]) ** 2).sum(1).mean() / var
        ramp = min(1.0, step / (0.2 * steps))
        loss = fvu + ramp * l0_coeff * fired.sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        out, fired = forward(x)
        stats = {
            "seconds": round(time.perf_counter() - t0, 1),
            "l0": round(float(fired.sum(1).mean()), 2),
            "fvu": round(float(((out - y) ** 2).sum(1).mean() / var), 5),
            "fvu_skip_only": round(fvu_skip / var, 5),  # what a least-squares skip alone would leave
            "skip": skip,
            "dead_latents": int((fired.sum(0) == 0).sum()),
            "n_tokens": n,
        }
    final = {k: v.detach() for k, v in params.items() if k != "log_threshold"}
    final["threshold"] = params["log_threshold"].detach().exp()
    return final, stats


def _text_args(a: dict) -> None:
    if not isinstance(a["text"], list):
        raise TypeError(f"text must be a list of token id lists (corpus()), got {type(a['text']).__name__}.")


@guarded(model="model", token_rows="text", check=_text_args)
@torch.no_grad()
def collect_activations(model, text: list[list[int]]) -> dict[int, tuple[Tensor, Tensor]]:
    """`{layer: (MLP inputs, MLP outputs)}` at every non-padding position after `<bos>`."""
    tokens = _pad(text, model.tokenizer.pad_token_id)
    lengths = torch.tensor([len(t) for t in text])
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]) & (
        torch.arange(tokens.shape[1])[None] > 0
    )
    names = {
        f"blocks.{layer}.{s}" for layer in range(model.cfg.n_layers) for s in ("mlp.hook_in", "hook_mlp_out")
    }
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, return_type=None)
    return {
        layer: (cache[f"blocks.{layer}.mlp.hook_in"][mask], cache[f"blocks.{layer}.hook_mlp_out"][mask])
        for layer in range(model.cfg.n_layers)
    }


def _answer_rows(text: list[list[int]]) -> Int[Tensor, " n_facts"]:
    """Rows of `collect_activations(model, text)` at the position that predicts each planted answer (`text`,
    `corpus()`'s, begins with every planted prompt followed by its answer)."""
    lengths = torch.tensor([len(t) - 1 for t in text])  # rows per sequence: every position after <bos>
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    n = len(planted.planted_facts())
    return starts[:n] + lengths[:n] - 2  # position p of a sequence is row start + p - 1; here p = len - 2


def train_world(
    seed: int = SHIPPED_SEED,
    model_steps: int = 1500,
    tc_steps: int = 3000,
    l0_coeff: float = 1e-2,
    weight_decay: float = 2.0,
    freeze_embeddings: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """`(model state, transcoder state, metadata)`: the whole recipe, seeded."""
    t0, c0 = time.perf_counter(), time.process_time()
    model, model_stats = train_model(
        seed, steps=model_steps, weight_decay=weight_decay, freeze_embeddings=freeze_embeddings
    )
    _, text = corpus(seed)
    acts = collect_activations(model, text)
    rows = _answer_rows(text)
    acts = {
        layer: (torch.cat([x] + [x[rows]] * ANSWER_COPIES), torch.cat([y] + [y[rows]] * ANSWER_COPIES))
        for layer, (x, y) in acts.items()
    }
    gen = torch.Generator().manual_seed(seed + 1)
    tc_state, tc_stats = {}, {}
    for layer, (x, y) in tqdm(acts.items(), desc="transcoders", leave=False):
        params, stats = train_transcoder(
            x, y, planted.PLANTED_SPEC.d_sae, gen, steps=tc_steps, l0_coeff=l0_coeff
        )
        tc_state.update({f"{layer}.{k}": v.contiguous() for k, v in params.items()})
        tc_stats[str(layer)] = stats
    model_state = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    meta = {
        "world": "planted",
        "seed": seed,
        "vocab_size": len(model.tokenizer),
        "spec": asdict(planted.PLANTED_SPEC),
        "model": model_stats,
        "transcoders": {
            "steps": tc_steps,
            "l0_coeff": l0_coeff,
            "answer_copies": ANSWER_COPIES,
            "per_layer": tc_stats,
        },
        "total_seconds": round(time.perf_counter() - t0, 1),
        "total_cpu_seconds": round(time.process_time() - c0, 1),
        "load_average": round(os.getloadavg()[0], 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return model_state, tc_state, meta


# The files the recipe writes, and the list it keeps of them in the folder it writes to.
WORLD_FILES = ("model.safetensors", "transcoders.safetensors", "meta.json")
MANIFEST = ".written-by-train_planted.json"


def world_folder(out: Path) -> OutputFolder:
    """`out` as the staging writer sees it: the recipe's three files and its list of them there."""
    return OutputFolder(Path(out), WORLD_FILES, MANIFEST)


def write_world(
    out: Path,
    model_state: dict,
    tc_state: dict,
    meta: dict,
    force: bool = False,
    folder: OutputFolder | None = None,
) -> None:
    """Write the three files into `out`, replacing the ones this recipe wrote there before together
    (`staging.OutputFolder`); the folder's other files stay, and a file of the same name that the recipe
    did not write is replaced only with `force`. `folder`: `out` as already checked (`main` checks it
    before training; a file saved there since is then not replaced)."""
    if folder is None:
        folder = world_folder(out)
        folder.check(WORLD_FILES, force)
    with folder.staged() as stage:
        save_file(model_state, str(stage / "model.safetensors"))
        save_file(tc_state, str(stage / "transcoders.safetensors"))
        (stage / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        for name in WORLD_FILES:
            (stage / name).chmod(0o644)  # package data: readable by all
        folder.commit(stage, list(WORLD_FILES))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=planted.planted_data_dir())
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace files in --out of the same names that the recipe did not write",
    )
    parser.add_argument("--seed", type=whole_number(0), default=SHIPPED_SEED)
    parser.add_argument("--model-steps", type=whole_number(1), default=1500)
    parser.add_argument("--tc-steps", type=whole_number(1), default=3000)
    parser.add_argument("--l0-coeff", type=real(0.0), default=1e-2)
    parser.add_argument(
        "--threads", type=whole_number(1), default=1, help="torch threads (1: fastest on a busy 2-core CPU)"
    )
    parser.add_argument("--weight-decay", type=real(0.0), default=2.0)
    parser.add_argument("--train-embeddings", action="store_true", help="train the (tied) embedding too")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Check `--out` first, train, write; a problem with `--out` is one line (exit status 1)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    folder = world_folder(args.out)
    try:
        folder.check(WORLD_FILES, args.force)
    except OutputError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    torch.set_num_threads(args.threads)
    model_state, tc_state, meta = train_world(
        args.seed,
        args.model_steps,
        args.tc_steps,
        args.l0_coeff,
        args.weight_decay,
        not args.train_embeddings,
    )
    try:
        write_world(args.out, model_state, tc_state, meta, folder=folder)
    except OutputError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    print(json.dumps(meta, indent=1))
    return meta


if __name__ == "__main__":
    main()
