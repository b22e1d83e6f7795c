"""A catalogue of learner answers for the autograder: realistic mistakes, and correct alternatives.

Each `Mutant` names the exercise it answers, the implementation, and the substring the autograder's
failure message must contain (the hint that names the mistake). Entries with `hint=None` are correct
answers written differently from the reference (loops, another algorithm, another style): they must
pass. `tests/test_autograder.py` runs them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from part3_attribution_graphs import exercises
from part3_attribution_graphs import solutions as S
from part3_attribution_graphs.attribution import (
    _can_reach,
    _reading_targets,
    _source_groups,
    read_hook_name,
    run_frozen_forward,
)
from part3_attribution_graphs.nodes import NodeInfo, NodeType, SalientToken


@dataclass(frozen=True)
class Mutant:
    exercise: str  # the test is tests.test_<exercise>
    name: str
    impl: Any
    hint: str | None  # substring of the expected failure; None: a correct alternative that must pass
    time_limit_s: float | None = None  # grade with this time limit (for mutants that never return)
    note: str | None = None  # a correct alternative that gets a note: substring of the printed `Note: ...`


MUTANTS: list[Mutant] = []
ALTERNATIVES: list[Mutant] = []


def mutant(exercise: str, hint: str, *, time_limit_s: float | None = None) -> Callable:
    exercises.get(exercise)  # a KeyError for an exercise the registry does not know

    def register(impl: Any) -> Any:
        MUTANTS.append(Mutant(exercise, impl.__name__, impl, hint, time_limit_s))
        return impl

    return register


def alternative(exercise: str, *, note: str | None = None) -> Callable:
    exercises.get(exercise)

    def register(impl: Any) -> Any:
        ALTERNATIVES.append(Mutant(exercise, impl.__name__, impl, None, note=note))
        return impl

    return register


# ==================================================================================================
# TranscoderReplacementHooks
# ==================================================================================================


class _LearnerHooks:
    """A learner's class in the notebook's style; subclasses switch on one mistake each."""

    permanent = True

    def __init__(self, model, transcoders, cache):
        self.model = model
        self.transcoders = transcoders
        self.cache = cache
        self.transcoder_acts: dict[int, Tensor] = {}
        self.transcoder_output: dict[int, Tensor] = {}
        self.current_ln_inputs: dict[int, Tensor] = {}

    def encode(self, layer, tc):
        with torch.no_grad():
            acts = tc.encode(self.cache[tc.cfg.metadata.hook_name])
            self.transcoder_acts[layer] = acts
            self.transcoder_output[layer] = tc.decode(acts)

    def capture_name(self, layer, tc):
        return tc.cfg.metadata.hook_name

    def skip(self, layer, tc, x):
        return x @ tc.W_skip.T

    def replace(self, mlp_out, skip):
        return skip + (mlp_out - skip).detach()

    def install(self):
        for layer, tc in self.transcoders.items():
            self.encode(layer, tc)

            def capture(x, hook, layer=layer):
                self.current_ln_inputs[layer] = x

            def skip_hook(mlp_out, hook, layer=layer, tc=tc):
                return self.replace(mlp_out, self.skip(layer, tc, self.current_ln_inputs[layer]))

            self.model.add_hook(self.capture_name(layer, tc), capture, is_permanent=self.permanent)
            self.model.add_hook(tc.cfg.metadata.hook_name_out, skip_hook, is_permanent=self.permanent)

    def remove(self):
        self.model.reset_hooks(including_permanent=True)


@mutant("transcoder_replacement_hooks", "flows through the real MLP")
class HooksWithoutDetach(_LearnerHooks):
    def replace(self, mlp_out, skip):
        return skip + (mlp_out - skip)


@mutant("transcoder_replacement_hooks", "use x @ W_skip.T")
class HooksSkipNotTransposed(_LearnerHooks):
    def skip(self, layer, tc, x):
        return x @ tc.W_skip


@mutant("transcoder_replacement_hooks", "LIVE MLP input")
class HooksCachedInput(_LearnerHooks):
    def skip(self, layer, tc, x):
        return self.cache[tc.cfg.metadata.hook_name] @ tc.W_skip.T


@mutant("transcoder_replacement_hooks", "reads hook_resid_mid")
class HooksReadResidMid(_LearnerHooks):
    def capture_name(self, layer, tc):
        return f"blocks.{layer}.hook_resid_mid"


@mutant("transcoder_replacement_hooks", "your remove() left 8 hooks on the model")
class HooksRemoveKeepsPermanent(_LearnerHooks):
    def remove(self):
        self.model.reset_hooks()  # only temporary hooks: the permanent ones stay


@mutant("transcoder_replacement_hooks", "not permanent")
class HooksNotPermanent(_LearnerHooks):
    permanent = False


@mutant("transcoder_replacement_hooks", "includes the skip term")
class HooksOutputWithSkip(_LearnerHooks):
    def encode(self, layer, tc):
        with torch.no_grad():
            x = self.cache[tc.cfg.metadata.hook_name]
            self.transcoder_acts[layer] = tc.encode(x)
            self.transcoder_output[layer] = tc(x)  # forward adds the skip


@mutant("transcoder_replacement_hooks", "different logits")
class HooksReturnSkipOnly(_LearnerHooks):
    def replace(self, mlp_out, skip):
        return skip


@mutant("transcoder_replacement_hooks", "install() added no hooks")
class HooksInstallOnlyEncodes(_LearnerHooks):
    def install(self):
        for layer, tc in self.transcoders.items():
            self.encode(layer, tc)


@mutant("transcoder_replacement_hooks", "did you fill in the stub?")
class HooksStub(_LearnerHooks):
    def install(self):
        raise NotImplementedError()


@mutant("transcoder_replacement_hooks", "`transcoder_acts` should be a dict")
class HooksNeverEncode(_LearnerHooks):
    def encode(self, layer, tc):
        pass


@alternative("transcoder_replacement_hooks")
class HooksEncodeInInitOwnHandles:
    """Activations in __init__, F.linear for the skip, removes exactly its own hooks."""

    def __init__(self, model, transcoders, cache):
        self.model, self.transcoders = model, transcoders
        with torch.no_grad():
            self.transcoder_acts = {
                i: tc.encode(cache[tc.cfg.metadata.hook_name]) for i, tc in transcoders.items()
            }
            self.transcoder_output = {i: transcoders[i].decode(a) for i, a in self.transcoder_acts.items()}
        self.live: dict[int, Tensor] = {}
        self.added: list[tuple[Any, Any]] = []

    def install(self):
        for layer, tc in self.transcoders.items():
            for name, fn in (
                (tc.cfg.metadata.hook_name, self._capture(layer)),
                (tc.cfg.metadata.hook_name_out, self._skip(layer, tc)),
            ):
                hp = self.model.mod_dict[name]
                hp.add_hook(fn, is_permanent=True)
                self.added.append((hp, hp.fwd_hooks[-1]))

    def _capture(self, layer):
        def fn(x, hook):
            self.live[layer] = x

        return fn

    def _skip(self, layer, tc):
        def fn(mlp_out, hook):
            skip = F.linear(self.live[layer], tc.W_skip)
            return skip + (mlp_out - skip).detach()

        return fn

    def remove(self):
        for hp, handle in self.added:
            handle.hook.remove()
            hp.fwd_hooks.remove(handle)
        self.added = []


@alternative("transcoder_replacement_hooks")
class HooksSeedStyleEinsum(_LearnerHooks):
    """The notebook's skeleton filled in, with an einsum and reset_hooks(including_permanent=True)."""

    def skip(self, layer, tc, x):
        return torch.einsum("bsi,oi->bso", x, tc.W_skip)


@alternative("transcoder_replacement_hooks")
class HooksReference(S.TranscoderReplacementHooks):
    """The reference itself, subclassed (e.g. a learner who extends the given class)."""


# Issue 21: mistakes whose message only said where values differ.


@mutant("transcoder_replacement_hooks", "you detached the wrong term")
class HooksDetachSwapped(_LearnerHooks):
    def replace(self, mlp_out, skip):
        return skip.detach() + (mlp_out - skip)


@mutant("transcoder_replacement_hooks", "through the real MLP AND the skip")
class HooksBothPaths(_LearnerHooks):
    """The straight-through trick written the other way round: the MLP's own gradient stays."""

    def replace(self, mlp_out, skip):
        return mlp_out + skip - skip.detach()


class _LearnerHooksEncoding(_LearnerHooks):
    """Encodes the cached tensor at `read(layer, tc)` instead of the MLP's input."""

    def read(self, layer, tc):
        return tc.cfg.metadata.hook_name

    def encode(self, layer, tc):
        with torch.no_grad():
            acts = tc.encode(self.cache[self.read(layer, tc)])
            self.transcoder_acts[layer] = acts
            self.transcoder_output[layer] = tc.decode(acts)


@mutant("transcoder_replacement_hooks", "you encoded the MLP's output")
class HooksEncodeMlpOut(_LearnerHooksEncoding):
    def read(self, layer, tc):
        return tc.cfg.metadata.hook_name_out


@mutant("transcoder_replacement_hooks", "you encoded the residual stream before ln2")
class HooksEncodeResidMid(_LearnerHooksEncoding):
    def read(self, layer, tc):
        return f"blocks.{layer}.hook_resid_mid"


@mutant("transcoder_replacement_hooks", "leaves out the decoder bias")
class HooksOutputWithoutBDec(_LearnerHooks):
    def encode(self, layer, tc):
        with torch.no_grad():
            acts = tc.encode(self.cache[tc.cfg.metadata.hook_name])
            self.transcoder_acts[layer] = acts
            self.transcoder_output[layer] = acts @ tc.W_dec  # decode() also adds b_dec


# ==================================================================================================
# compute_salient_logits
# ==================================================================================================


def _salient(
    model,
    logits,
    n,
    *,
    pos=-1,
    softmax_dim=-1,
    demean="vocab",
    return_logits=False,
    transpose=False,
    ids="token",
):
    if softmax_dim == -1:
        probs = logits[0, pos].softmax(dim=-1)
    else:
        probs = logits.softmax(dim=softmax_dim)[0, pos]
    top_probs, top_ids = probs.topk(n)
    W_U = model.W_U
    if demean == "vocab":
        vecs = W_U[:, top_ids].T - W_U.mean(dim=-1)
    elif demean == "d_model":
        vecs = (W_U - W_U.mean(dim=0, keepdim=True))[:, top_ids].T
    else:
        vecs = W_U[:, top_ids].T
    values = logits[0, pos, top_ids] if return_logits else top_probs
    if ids == "pair":
        info = [(model.tokenizer.decode(i.item()), v.item()) for i, v in zip(top_ids, values)]
    else:
        info = [
            SalientToken(model.tokenizer.decode(i.item()), v.item(), i.item() if ids == "token" else rank)
            for rank, (i, v) in enumerate(zip(top_ids, values))
        ]
    return (vecs.T if transpose else vecs), info


@mutant("compute_salient_logits", "not demeaned")
def salient_not_demeaned(model, logits, n_output_nodes=3):
    return _salient(model, logits, n_output_nodes, demean=None)


@mutant("compute_salient_logits", "use logits[0, -1]")
def salient_position_zero(model, logits, n_output_nodes=3):
    return _salient(model, logits, n_output_nodes, pos=0)


@mutant("compute_salient_logits", "wrong dimension")
def salient_softmax_over_seq(model, logits, n_output_nodes=3):
    return _salient(model, logits, n_output_nodes, softmax_dim=1)


@mutant("compute_salient_logits", "not probabilities")
def salient_returns_logits(model, logits, n_output_nodes=3):
    return _salient(model, logits, n_output_nodes, return_logits=True)


@mutant("compute_salient_logits", "wrong axis")
def salient_mean_over_d_model(model, logits, n_output_nodes=3):
    return _salient(model, logits, n_output_nodes, demean="d_model")


@mutant("compute_salient_logits", "has shape (64, 3), expected (3, 64)")
def salient_columns_not_rows(model, logits, n_output_nodes=3):
    return _salient(model, logits, n_output_nodes, transpose=True)


@mutant("compute_salient_logits", "did you fill in the stub?")
def salient_stub(model, logits, n_output_nodes=3):
    raise NotImplementedError()


@mutant("compute_salient_logits", "should return a tuple of 2 things, got NoneType")
def salient_forgets_return(model, logits, n_output_nodes=3):
    _salient(model, logits, n_output_nodes)


@mutant("compute_salient_logits", "keep the order of decreasing probability")
def salient_sorted_by_token_id(model, logits, n_output_nodes=3):
    probs = logits[0, -1].softmax(dim=-1)
    ids = probs.topk(n_output_nodes).indices.sort().values
    vecs = model.W_U[:, ids].T - model.W_U.mean(dim=-1)
    return vecs, [(model.tokenizer.decode([int(i)]), probs[i].item()) for i in ids]


@mutant("compute_salient_logits", "not the pair")
def salient_plain_pairs(model, logits, n_output_nodes=3):
    return _salient(model, logits, n_output_nodes, ids="pair")


@mutant("compute_salient_logits", "should be its index in the vocabulary")
def salient_rank_as_id(model, logits, n_output_nodes=3):
    return _salient(model, logits, n_output_nodes, ids="rank")


@alternative("compute_salient_logits")
def salient_by_sorting(model, logits, n_output_nodes=3):
    """Plain (str, prob, id) triples, with 0-dim tensor ids, work as well as SalientToken."""
    probs = torch.softmax(logits[0, -1].float(), dim=0)
    order = probs.argsort(descending=True)[:n_output_nodes]
    centred = model.W_U - model.W_U.mean(dim=1, keepdim=True)
    info = [(model.to_single_str_token(int(i)), float(probs[i]), i) for i in order]
    return centred[:, order].T.detach(), info


@alternative("compute_salient_logits")
def salient_seed_style(model, logits, n_output_nodes=3):
    return _salient(model, logits, n_output_nodes)


# Side effects: each answer below is right, but leaves the model changed for the next exercise.


@mutant("compute_salient_logits", "changed model.unembed.W_U (demeaning it?) in place")
def salient_demeans_W_U_in_place(model, logits, n_output_nodes=3):
    """`-=` on a detached view writes into the model's own unembedding."""
    probs = logits[0, -1].softmax(dim=-1)
    top_probs, top_ids = probs.topk(n_output_nodes)
    W_U = model.W_U.detach()
    W_U -= W_U.mean(dim=-1, keepdim=True)
    return W_U[:, top_ids].T.clone(), [
        (model.tokenizer.decode([int(i)]), p.item()) for i, p in zip(top_ids, top_probs)
    ]


@mutant("compute_salient_logits", "left 1 hook on the model (1 on blocks.1.hook_resid_post)")
def salient_leaves_a_hook(model, logits, n_output_nodes=3):
    """A debugging hook (it zeroes the residual stream) added and never removed."""
    model.add_hook("blocks.1.hook_resid_post", lambda x, hook: torch.zeros_like(x))
    return _salient(model, logits, n_output_nodes)


@mutant("compute_salient_logits", "time limit of 1 s and was stopped", time_limit_s=1.0)
def salient_never_returns(model, logits, n_output_nodes=3):
    """An endless loop: the test must stop it."""
    k = 0
    while k >= 0:
        k += 1
    return _salient(model, logits, n_output_nodes)


# Issue 21: mistakes whose message only said where values differ.


def _salient_info(model, probs, ids):
    return [
        SalientToken(model.tokenizer.decode([int(i)]), float(probs[k]), int(i)) for k, i in enumerate(ids)
    ]


@mutant("compute_salient_logits", "one position before the last")
def salient_second_to_last(model, logits, n_output_nodes=3):
    return _salient(model, logits, n_output_nodes, pos=-2)


@mutant("compute_salient_logits", "you subtracted one number, W_U.mean()")
def salient_scalar_mean(model, logits, n_output_nodes=3):
    probs, ids = logits[0, -1].softmax(dim=-1).topk(n_output_nodes)
    return model.W_U[:, ids].T - model.W_U.mean(), _salient_info(model, probs, ids)


@mutant("compute_salient_logits", "scaled to unit length")
def salient_unit_length(model, logits, n_output_nodes=3):
    vecs, info = _salient(model, logits, n_output_nodes)
    return F.normalize(vecs, dim=-1), info


@mutant("compute_salient_logits", "softmax over the top n_output_nodes logits only")
def salient_softmax_over_top(model, logits, n_output_nodes=3):
    top, ids = logits[0, -1].topk(n_output_nodes)
    vecs = model.W_U[:, ids].T - model.W_U.mean(dim=-1)
    return vecs, _salient_info(model, top.softmax(dim=-1), ids)


@mutant("compute_salient_logits", "a token's unembedding is the column W_U[:, token_id]")
def salient_rows_of_W_U(model, logits, n_output_nodes=3):
    probs, ids = logits[0, -1].softmax(dim=-1).topk(n_output_nodes)
    return model.W_U[ids] - model.W_U.mean(dim=0), _salient_info(model, probs, ids)


# ==================================================================================================
# build_embedding_nodes
# ==================================================================================================


def _embeddings(
    model,
    cache,
    tokens,
    *,
    source="cache",
    read_same=False,
    feature="token",
    layer="E",
    first=0,
    stacked=False,
):
    embeds = {
        "cache": lambda: cache["blocks.0.hook_resid_pre"][0],
        "W_E": lambda: model.W_E[tokens[0]],
        "W_E_by_position": lambda: model.W_E[: tokens.shape[1]],
    }[source]()
    nodes, writing, reading = [], [], []
    for pos in range(first, tokens.shape[1]):
        tok = tokens[0, pos].item()
        nodes.append(
            NodeInfo(
                NodeType.EMBEDDING,
                layer,
                pos,
                tok if feature == "token" else pos,
                str_token=model.tokenizer.decode(tok),
            )
        )
        writing.append(embeds[pos])
        reading.append(embeds[pos] if read_same else torch.zeros(model.cfg.d_model))
    if stacked:
        return nodes, torch.stack(writing), torch.stack(reading)
    return nodes, writing, reading


@mutant("build_embedding_nodes", "indexed W_E by position")
def embeddings_by_position(model, cache, tokens):
    return _embeddings(model, cache, tokens, source="W_E_by_position")


@mutant("build_embedding_nodes", "scaled twice")
def embeddings_scaled_by_sqrt_d_model(model, cache, tokens):
    """What the old hint suggested: W_E already holds Gemma's sqrt(d_model) scale."""
    nodes, writing, reading = _embeddings(model, cache, tokens, source="W_E")
    return nodes, [w * model.cfg.d_model**0.5 for w in writing], reading


@mutant("build_embedding_nodes", "after block 0")
def embeddings_resid_post(model, cache, tokens):
    _, post = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    nodes, _, reading = _embeddings(model, cache, tokens)
    return nodes, list(post["blocks.0.hook_resid_post"][0].unbind(0)), reading


@mutant("build_embedding_nodes", "reading vectors should be zeros")
def embeddings_read_themselves(model, cache, tokens):
    return _embeddings(model, cache, tokens, read_same=True)


@mutant("build_embedding_nodes", "that is the position")
def embeddings_feature_is_position(model, cache, tokens):
    return _embeddings(model, cache, tokens, feature="position")


@mutant("build_embedding_nodes", 'embedding nodes have layer "E"')
def embeddings_layer_zero(model, cache, tokens):
    return _embeddings(model, cache, tokens, layer=0)


@mutant("build_embedding_nodes", "<bos> included")
def embeddings_skip_bos(model, cache, tokens):
    return _embeddings(model, cache, tokens, first=1)


@mutant("build_embedding_nodes", "not a stacked tensor")
def embeddings_stacked(model, cache, tokens):
    return _embeddings(model, cache, tokens, stacked=True)


@alternative("build_embedding_nodes")
def embeddings_seed_style(model, cache, tokens):
    return _embeddings(model, cache, tokens)


@alternative("build_embedding_nodes")
def embeddings_from_W_E(model, cache, tokens):
    """TransformerLens folds Gemma's sqrt(d_model) into W_E, so its rows are exactly the cached embeddings."""
    return _embeddings(model, cache, tokens, source="W_E")


@alternative("build_embedding_nodes")
def embeddings_vectorised(model, cache, tokens):
    embeds = cache["blocks.0.hook_resid_pre"][0]
    strs = model.to_str_tokens(tokens[0])
    nodes = [
        NodeInfo(NodeType.EMBEDDING, "E", p, int(t), str_token=s)
        for p, (t, s) in enumerate(zip(tokens[0], strs))
    ]
    return nodes, list(embeds.unbind(0)), list(torch.zeros_like(embeds).unbind(0))


class _NotebookNodeType(Enum):
    """A notebook that defines its own copy of the enum (same values, a different class)."""

    EMBEDDING = "embedding"
    LATENT = "latent"
    MLP_ERROR = "mlp_error"
    LOGIT = "logit"


@dataclass
class _NotebookNodeInfo:
    node_type: _NotebookNodeType
    layer: int | str
    ctx_idx: int
    feature: int
    activation: float = 0.0
    token_prob: float = 0.0
    str_token: str = ""
    label: str = ""


@alternative("build_embedding_nodes")
def embeddings_with_notebook_classes(model, cache, tokens):
    embeds = cache["blocks.0.hook_resid_pre"][0]
    nodes = [
        _NotebookNodeInfo(_NotebookNodeType.EMBEDDING, "E", p, t, str_token=model.tokenizer.decode([t]))
        for p, t in enumerate(tokens[0].tolist())
    ]
    return nodes, [e for e in embeds], [torch.zeros_like(e) for e in embeds]


@mutant("build_embedding_nodes", "left 1 hook on the model (1 on blocks.0.mlp)")
def embeddings_leave_a_torch_hook(model, cache, tokens):
    """A raw PyTorch hook on an MLP module, never removed."""
    model.blocks[0].mlp.register_forward_hook(lambda module, args, out: out * 0)
    return _embeddings(model, cache, tokens)


@mutant("build_embedding_nodes", "changed its input cache['blocks.0.hook_resid_pre'] in place")
def embeddings_scale_the_cache(model, cache, tokens):
    """Follows a wrong hint (multiply by sqrt(d_model)) on the cached tensor itself."""
    embeddings = cache["blocks.0.hook_resid_pre"]
    embeddings *= model.cfg.d_model**0.5
    return _embeddings(model, cache, tokens)


# Issue 21: mistakes whose message only said where values differ.


@mutant("build_embedding_nodes", "ln1.hook_normalized")
def embeddings_after_layer_norm(model, cache, tokens):
    _, normed = model.run_with_cache(tokens, names_filter="blocks.0.ln1.hook_normalized")
    nodes, _, reading = _embeddings(model, cache, tokens)
    return nodes, list(normed["blocks.0.ln1.hook_normalized"][0].unbind(0)), reading


@mutant("build_embedding_nodes", "unembedding columns")
def embeddings_from_W_U(model, cache, tokens):
    nodes, _, reading = _embeddings(model, cache, tokens)
    return nodes, list(model.W_U[:, tokens[0]].T.unbind(0)), reading


@mutant("build_embedding_nodes", "you divided the embeddings by sqrt(d_model)")
def embeddings_divided_by_sqrt_d_model(model, cache, tokens):
    """Undoing a scale that TransformerLens folded in on purpose."""
    nodes, writing, reading = _embeddings(model, cache, tokens)
    return nodes, [v / model.cfg.d_model**0.5 for v in writing], reading


@mutant("build_embedding_nodes", "shifted by one position")
def embeddings_shifted_by_one(model, cache, tokens):
    """Node pos writes the embedding of the token after it (the last one wraps round to <bos>)."""
    nodes, writing, reading = _embeddings(model, cache, tokens)
    return nodes, writing[1:] + writing[:1], reading


# ==================================================================================================
# build_intermediate_nodes
# ==================================================================================================


def _intermediate(
    transcoders,
    cache,
    tc_hooks,
    tokens,
    d_model,
    start_posn=4,
    top_k=5,
    *,
    error="project",
    keep_zero=False,
    reading="enc_col",
    writing="scaled",
    first=None,
    no_error=False,
    fixed_k=None,
):
    """The notebook's loop, filled in; keyword switches reproduce one mistake each."""
    nodes, writing_vecs, reading_vecs, ranges = [], [], [], {}
    first = start_posn if first is None else first
    for layer in range(len(transcoders)):
        tc = transcoders[layer]
        layer_start = len(nodes)
        acts_all = tc_hooks.transcoder_acts[layer][0]
        mlp_out = cache[tc.cfg.metadata.hook_name_out][0]
        for pos in range(first, tokens.shape[1]):
            acts = acts_all[pos]
            k = fixed_k or top_k
            if not keep_zero:
                k = min(k, int((acts > 0).sum()))
            vals, idx = acts.topk(k)
            kept = torch.zeros(d_model)
            for a, f in zip(vals.tolist(), idx.tolist()):
                nodes.append(NodeInfo(NodeType.LATENT, layer, pos, f, activation=a))
                w_vec = a * tc.W_dec[f] if writing == "scaled" else tc.W_dec[f]
                writing_vecs.append(w_vec.detach())
                kept = kept + a * tc.W_dec[f].detach()
                if reading == "enc_col":
                    r_vec = tc.W_enc[:, f]
                elif reading == "enc_row":
                    r_vec = tc.W_enc[f]
                else:
                    r_vec = tc.W_dec[f]
                reading_vecs.append(r_vec.detach())
            if no_error:
                continue
            skip = tc_hooks.skip_output[layer][0, pos]
            b_dec = tc.b_dec.detach()
            decoded = tc_hooks.transcoder_output[layer][0, pos]
            if error == "project":
                err = mlp_out[pos] - kept - b_dec - skip
            elif error == "seed":
                err = mlp_out[pos] - decoded
            elif error == "no_b_dec":
                err = mlp_out[pos] - kept - skip
            elif error == "no_skip":
                err = mlp_out[pos] - kept - b_dec
            else:  # "all_latents"
                err = mlp_out[pos] - decoded - skip
            nodes.append(NodeInfo(NodeType.MLP_ERROR, layer, pos, 0))
            writing_vecs.append(err.detach())
            reading_vecs.append(torch.zeros(d_model))
        ranges[layer] = (layer_start, len(nodes))
    return nodes, writing_vecs, reading_vecs, ranges


@mutant("build_intermediate_nodes", "counted twice")
def intermediate_seed_error(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, error="seed")


@mutant("build_intermediate_nodes", "forgets b_dec")
def intermediate_error_without_b_dec(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, error="no_b_dec")


@mutant("build_intermediate_nodes", "forgets the skip term")
def intermediate_error_without_skip(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, error="no_skip")


@mutant("build_intermediate_nodes", "subtract only the latents kept")
def intermediate_error_without_all_latents(
    transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5
):
    return _intermediate(
        transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, error="all_latents"
    )


@mutant("build_intermediate_nodes", "zero activation")
def intermediate_keeps_zero_latents(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, keep_zero=True)


@mutant("build_intermediate_nodes", "W_enc[:, f]")
def intermediate_reads_encoder_row(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, reading="enc_row")


@mutant("build_intermediate_nodes", "reads its encoder direction")
def intermediate_reads_decoder(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, reading="dec")


@mutant("build_intermediate_nodes", "not scaled by the activation")
def intermediate_unscaled_writing(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, writing="unscaled")


@mutant("build_intermediate_nodes", "off by one")
def intermediate_positions_off_by_one(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(
        transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, first=start_posn + 1
    )


@mutant("build_intermediate_nodes", "not a hard-coded 4")
def intermediate_hard_coded_start(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, first=4)


@mutant("build_intermediate_nodes", "no MLP_ERROR node")
def intermediate_no_error_nodes(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, no_error=True)


@mutant("build_intermediate_nodes", "most active")
def intermediate_hard_coded_top_k(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, fixed_k=5)


@alternative("build_intermediate_nodes")
def intermediate_notebook_loop(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k)


@alternative("build_intermediate_nodes")
def intermediate_by_feature_index(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    """Latents listed by feature index, and the error as the seed's plus the skip and the dropped latents."""
    nodes, writing, reading, ranges = [], [], [], {}
    for layer, tc in sorted(transcoders.items()):
        start = len(nodes)
        for pos in range(start_posn, tokens.shape[1]):
            acts = tc_hooks.transcoder_acts[layer][0, pos]
            active = torch.nonzero(acts > 0).flatten()
            chosen = active[acts[active].argsort(descending=True)[:top_k]].sort().values
            for f in chosen.tolist():
                nodes.append(NodeInfo(NodeType.LATENT, layer, pos, f, activation=acts[f].item()))
                writing.append(acts[f] * tc.W_dec[f].detach())
                reading.append(tc.W_enc.detach().T[f])
            dropped = active[~torch.isin(active, chosen)]
            dropped_out = acts[dropped] @ tc.W_dec.detach()[dropped]
            mlp_out = cache[tc.cfg.metadata.hook_name_out][0, pos]
            error = (
                mlp_out
                - tc_hooks.transcoder_output[layer][0, pos]
                - tc_hooks.skip_output[layer][0, pos]
                + dropped_out
            )
            nodes.append(NodeInfo(NodeType.MLP_ERROR, layer, pos, 0))
            writing.append(error)
            reading.append(torch.zeros(d_model))
        ranges[layer] = (start, len(nodes))
    return nodes, writing, reading, ranges


@mutant("build_intermediate_nodes", "left 1 hook on the model (1 on transcoders[1].hook_sae_acts_post)")
def intermediate_leaves_a_transcoder_hook(
    transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5
):
    """A TransformerLens hook on a transcoder's own hook point, never removed."""
    transcoders[1].hook_sae_acts_post.add_hook(lambda x, hook: 0 * x)
    return _intermediate(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k)


# Issue 21: mistakes whose message only said where values differ. Each edits one kind of vector of the
# notebook loop's answer.


def _intermediate_edited(transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, kind, edit):
    nodes, writing, reading, ranges = _intermediate(
        transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k
    )
    vecs = writing if kind != "latent_reading" else reading
    node_type = NodeType.MLP_ERROR if kind == "error" else NodeType.LATENT
    for i, node in enumerate(nodes):
        if node.node_type == node_type:
            vecs[i] = edit(transcoders[node.layer], node, vecs[i], cache)
    return nodes, writing, reading, ranges


@mutant("build_intermediate_nodes", "your error node has the wrong sign")
def intermediate_error_negated(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate_edited(
        transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, "error", lambda tc, n, v, c: -v
    )


@mutant("build_intermediate_nodes", "your error node starts from the MLP's input")
def intermediate_error_from_mlp_input(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    def edit(tc, node, v, c):
        return (
            v
            - c[tc.cfg.metadata.hook_name_out][0, node.ctx_idx]
            + c[tc.cfg.metadata.hook_name][0, node.ctx_idx]
        )

    return _intermediate_edited(
        transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, "error", edit
    )


@mutant("build_intermediate_nodes", "subtracts b_dec twice")
def intermediate_error_b_dec_twice(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate_edited(
        transcoders,
        cache,
        tc_hooks,
        tokens,
        d_model,
        start_posn,
        top_k,
        "error",
        lambda tc, n, v, c: v - tc.b_dec.detach(),
    )


@mutant("build_intermediate_nodes", "you added b_dec to each latent's writing vector")
def intermediate_writing_with_b_dec(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate_edited(
        transcoders,
        cache,
        tc_hooks,
        tokens,
        d_model,
        start_posn,
        top_k,
        "latent_writing",
        lambda tc, n, v, c: v + tc.b_dec.detach(),
    )


@mutant("build_intermediate_nodes", "your latent writing vectors are scaled to unit length")
def intermediate_writing_unit_length(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate_edited(
        transcoders,
        cache,
        tc_hooks,
        tokens,
        d_model,
        start_posn,
        top_k,
        "latent_writing",
        lambda tc, n, v, c: F.normalize(v, dim=0),
    )


@mutant("build_intermediate_nodes", "your latent reading vectors are scaled to unit length")
def intermediate_reading_unit_length(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    return _intermediate_edited(
        transcoders,
        cache,
        tc_hooks,
        tokens,
        d_model,
        start_posn,
        top_k,
        "latent_reading",
        lambda tc, n, v, c: F.normalize(v, dim=0),
    )


@mutant("build_intermediate_nodes", "read at the neighbouring position")
def intermediate_activation_one_before(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    nodes, writing, reading, ranges = _intermediate(
        transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k
    )
    for node in nodes:
        if node.node_type == NodeType.LATENT:
            node.activation = tc_hooks.transcoder_acts[node.layer][0, node.ctx_idx - 1, node.feature].item()
    return nodes, writing, reading, ranges


@mutant("build_intermediate_nodes", "come from the next layer's transcoder")
def intermediate_reading_next_layer(transcoders, cache, tc_hooks, tokens, d_model, start_posn=4, top_k=5):
    def edit(tc, node, v, c):
        return transcoders[(node.layer + 1) % len(transcoders)].W_enc[:, node.feature].detach()

    return _intermediate_edited(
        transcoders, cache, tc_hooks, tokens, d_model, start_posn, top_k, "latent_reading", edit
    )


# ==================================================================================================
# prepare_backward_batches
# ==================================================================================================


def _batches(
    graph,
    batch_size=8,
    *,
    skip_e=True,
    local_start=False,
    positions_list=False,
    skip_logits=False,
    read_shift=0,
    keep_empty=False,
):
    batches = []
    for key, (start, end) in graph.node_range_dict.items():
        if (key == "E" and skip_e) or (key == "L" and skip_logits):
            continue
        offsets = list(range(0, end - start, batch_size)) or ([0] if keep_empty else [])
        for off in offsets:
            lo, hi = start + off, min(start + off + batch_size, end)
            nodes = graph.nodes[lo:hi]
            positions = [n.ctx_idx for n in nodes]
            batches.append(
                (
                    off if local_start else lo,
                    nodes,
                    graph.reading_vecs[lo + read_shift : hi + read_shift],
                    positions if positions_list else torch.tensor(positions),
                    [n.layer for n in nodes],
                )
            )
    return batches


@mutant("prepare_backward_batches", "skip the embeddings")
def batches_with_embeddings(graph, batch_size=8):
    return _batches(graph, batch_size, skip_e=False)


@mutant("prepare_backward_batches", "offset within the layer")
def batches_local_start(graph, batch_size=8):
    return _batches(graph, batch_size, local_start=True)


@mutant("prepare_backward_batches", "single layer")
def batches_across_layers(graph, batch_size=8):
    first = graph.node_range_dict["E"][1]
    out = []
    for lo in range(first, len(graph.nodes), batch_size):
        nodes = graph.nodes[lo : lo + batch_size]
        out.append(
            (
                lo,
                nodes,
                graph.reading_vecs[lo : lo + len(nodes)],
                torch.tensor([n.ctx_idx for n in nodes]),
                [n.layer for n in nodes],
            )
        )
    return out


@mutant("prepare_backward_batches", "positions should be a tensor")
def batches_positions_list(graph, batch_size=8):
    return _batches(graph, batch_size, positions_list=True)


@mutant("prepare_backward_batches", "logit nodes ('L') are targets too")
def batches_without_logits(graph, batch_size=8):
    return _batches(graph, batch_size, skip_logits=True)


@mutant("prepare_backward_batches", "reading_vecs should be graph.reading_vecs")
def batches_reading_shifted(graph, batch_size=8):
    return _batches(graph, batch_size, read_shift=1)


@mutant("prepare_backward_batches", "is empty")
def batches_keep_empty_layers(graph, batch_size=8):
    return _batches(graph, batch_size, keep_empty=True)


@alternative("prepare_backward_batches")
def batches_seed_style(graph, batch_size=8):
    return _batches(graph, batch_size)


@alternative("prepare_backward_batches")
def batches_with_split(graph, batch_size=8):
    out = []
    for key, (start, end) in graph.node_range_dict.items():
        if key == "E" or end == start:
            continue
        idx = torch.arange(start, end)
        for chunk in idx.split(batch_size):
            lo = int(chunk[0])
            nodes = [graph.nodes[i] for i in chunk.tolist()]
            out.append(
                (
                    lo,
                    nodes,
                    graph.reading_vecs[chunk],
                    torch.tensor([n.ctx_idx for n in nodes]),
                    [n.layer for n in nodes],
                )
            )
    return out[::-1]  # order of batches does not matter


# Issue 21: mistakes whose message only said what was expected.


@mutant("prepare_backward_batches", "You passed their writing vectors")
def batches_writing_vecs(graph, batch_size=8):
    return [
        (start, nodes, graph.writing_vecs[start : start + len(nodes)], positions, layers)
        for start, nodes, _, positions, layers in _batches(graph, batch_size)
    ]


@mutant("prepare_backward_batches", "those are the nodes' indices in graph.nodes")
def batches_node_indices_as_positions(graph, batch_size=8):
    return [
        (start, nodes, reading, torch.arange(start, start + len(nodes)), layers)
        for start, nodes, reading, _, layers in _batches(graph, batch_size)
    ]


@mutant("prepare_backward_batches", "those are the nodes' positions, ctx_idx")
def batches_positions_as_layers(graph, batch_size=8):
    return [
        (start, nodes, reading, positions, [n.ctx_idx for n in nodes])
        for start, nodes, reading, positions, _ in _batches(graph, batch_size)
    ]


# ==================================================================================================
# compute_adjacency_matrix
# ==================================================================================================


def _adjacency(
    model,
    tokens,
    graph,
    freeze,
    tc_hooks,
    batches,
    start_posn=4,
    *,
    transpose=False,
    mask=True,
    fixed_mask=None,
    install=True,
    remove=True,
    all_from_embeddings=False,
    local_rows=False,
):
    """The notebook's skeleton filled in (loop over sources); switches reproduce one mistake each."""
    n = len(graph.nodes)
    A = torch.zeros(n, n)
    for start, nodes, reading, positions, layers in batches:
        if install:
            tc_hooks.install()
        grads = S.setup_attribution(model, tokens, freeze, reading, positions, layers)
        if remove:
            tc_hooks.remove()
        for src, node in enumerate(graph.nodes):
            if node.node_type == NodeType.LOGIT:
                continue
            name = (
                "blocks.0.hook_resid_pre"
                if node.node_type == NodeType.EMBEDDING or all_from_embeddings
                else f"blocks.{node.layer}.hook_mlp_out"
            )
            g = grads[name][: len(nodes), node.ctx_idx]
            weights = g @ graph.writing_vecs[src]
            limit = start_posn if fixed_mask is None else fixed_mask
            if mask and node.ctx_idx < limit:
                weights = torch.zeros_like(weights)
            rows = slice(0, len(nodes)) if local_rows else slice(start, start + len(nodes))
            if transpose:
                A[src, rows] = weights
            else:
                A[rows, src] = weights
    return A


@mutant("compute_adjacency_matrix", "transposed")
def adjacency_transposed(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    return _adjacency(model, tokens, graph, freeze, tc_hooks, batches, start_posn, transpose=True)


@mutant("compute_adjacency_matrix", "positions < start_posn")
def adjacency_unmasked(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    return _adjacency(model, tokens, graph, freeze, tc_hooks, batches, start_posn, mask=False)


@mutant("compute_adjacency_matrix", "positions < start_posn")
def adjacency_mask_hard_coded(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    return _adjacency(model, tokens, graph, freeze, tc_hooks, batches, start_posn, fixed_mask=4)


@mutant("compute_adjacency_matrix", "install the transcoder hooks")
def adjacency_without_tc_hooks(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    return _adjacency(
        model, tokens, graph, freeze, tc_hooks, batches, start_posn, install=False, remove=False
    )


@mutant("compute_adjacency_matrix", "left 8 hooks on the model")
def adjacency_never_removes(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    return _adjacency(model, tokens, graph, freeze, tc_hooks, batches, start_posn, remove=False)


@mutant("compute_adjacency_matrix", "edges from embeddings are right")
def adjacency_one_gradient_for_all(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    return _adjacency(model, tokens, graph, freeze, tc_hooks, batches, start_posn, all_from_embeddings=True)


@mutant("compute_adjacency_matrix", "fill rows global_start_idx + b")
def adjacency_batch_rows(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    return _adjacency(model, tokens, graph, freeze, tc_hooks, batches, start_posn, local_rows=True)


@mutant("compute_adjacency_matrix", "KeyError")
def adjacency_resid_post_key(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    """The seed's hint names hook_resid_post, which setup_attribution does not return."""
    tc_hooks.install()
    try:
        grads = S.setup_attribution(model, tokens, freeze, *batches[0][2:])
        return grads[f"blocks.{graph.nodes[-1].layer}.hook_resid_post"]
    finally:
        tc_hooks.remove()


@alternative("compute_adjacency_matrix")
def adjacency_seed_loop(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    return _adjacency(model, tokens, graph, freeze, tc_hooks, batches, start_posn)


@alternative("compute_adjacency_matrix")
def adjacency_vectorised(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    """Install once, one matmul per batch over all sources at once."""
    n = len(graph.nodes)
    A = torch.zeros(n, n, dtype=graph.writing_vecs.dtype)
    sources = [
        i for i, nd in enumerate(graph.nodes) if nd.node_type != NodeType.LOGIT and nd.ctx_idx >= start_posn
    ]
    names = [
        "blocks.0.hook_resid_pre"
        if graph.nodes[i].layer == "E"
        else f"blocks.{graph.nodes[i].layer}.hook_mlp_out"
        for i in sources
    ]
    pos = torch.tensor([graph.nodes[i].ctx_idx for i in sources])
    tc_hooks.install()
    try:
        for start, nodes, reading, positions, layers in batches:
            grads = S.setup_attribution(model, tokens, freeze, reading, positions, layers)
            g = torch.stack(
                [grads[name][:, p] for name, p in zip(names, pos.tolist())], dim=1
            )  # (b, n_src, d)
            A[start : start + len(nodes), sources] = (g * graph.writing_vecs[sources]).sum(-1)
    finally:
        tc_hooks.remove()
    return A


def _adjacency_grouped(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4, *, place):
    """The notebook's scaffold (groups of sources by write point), with `place` writing each group's edges."""
    A = torch.zeros(len(graph.nodes), len(graph.nodes), dtype=graph.writing_vecs.dtype)
    groups = _source_groups(graph, start_posn)
    targets = _reading_targets(graph, batches)
    read_names = {read_hook_name(layer) for *_, layers in targets for layer in layers}
    tc_hooks.install()
    try:
        forward = run_frozen_forward(model, tokens, freeze, read_names)
        for rows, reading, positions, layers in targets:
            grads = S.setup_attribution(model, tokens, freeze, reading, positions, layers, forward=forward)
            for key, name, cols, slots, writes in groups:
                if _can_reach(key, layers):
                    edges = torch.einsum("bpd,pkd->bpk", grads[name], writes)
                    place(A, rows, cols, slots, edges)
    finally:
        tc_hooks.remove()
    return A


@mutant("compute_adjacency_matrix", "writes into a copy")
def adjacency_writes_into_a_copy(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    def place(A, rows, cols, slots, edges):
        A[rows][:, cols] = edges.flatten(1)[:, slots]

    return _adjacency_grouped(model, tokens, graph, freeze, tc_hooks, batches, start_posn, place=place)


@mutant("compute_adjacency_matrix", "take each source's column with [:, slots]")
def adjacency_without_slots(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    """The first n_sources columns of the (position, k) layout, as if it held one column per source."""

    def place(A, rows, cols, slots, edges):
        A[rows, cols] = edges.flatten(1)[:, : cols.stop - cols.start]

    return _adjacency_grouped(model, tokens, graph, freeze, tc_hooks, batches, start_posn, place=place)


@mutant("compute_adjacency_matrix", "take each source's column with [:, slots]")
def adjacency_flattened_without_slots(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    """The whole (position, k) layout, padding included: a shape mismatch."""

    def place(A, rows, cols, slots, edges):
        A[rows, cols] = edges.flatten(1)

    return _adjacency_grouped(model, tokens, graph, freeze, tc_hooks, batches, start_posn, place=place)


@alternative("compute_adjacency_matrix")
def adjacency_grouped_like_the_notebook(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    def place(A, rows, cols, slots, edges):
        A[rows, cols] = edges.flatten(1)[:, slots]

    return _adjacency_grouped(model, tokens, graph, freeze, tc_hooks, batches, start_posn, place=place)


# Issue 21: mistakes that were told their rows were not filled.


@mutant("compute_adjacency_matrix", "(ctx_idx < start_posn, not <=)")
def adjacency_masks_start_posn_too(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    return _adjacency(model, tokens, graph, freeze, tc_hooks, batches, start_posn, fixed_mask=start_posn + 1)


@mutant("compute_adjacency_matrix", "each source's READING vector")
def adjacency_reading_vectors(model, tokens, graph, freeze, tc_hooks, batches, start_posn=4):
    """The source's reading vector where its writing vector belongs (embeddings read zeros)."""
    swapped = replace(graph, writing_vecs=graph.reading_vecs)
    return _adjacency(model, tokens, swapped, freeze, tc_hooks, batches, start_posn)


# ==================================================================================================
# compute_influence
# ==================================================================================================


def _influence(
    A,
    logit_weights,
    n_layers,
    *,
    k0=False,
    terms=None,
    normalise="rows",
    left=True,
    logits_first=False,
    clamp=True,
):
    absA = A.abs() if normalise != "signed" else A
    if normalise in ("rows", "signed"):
        sums = absA.sum(dim=1, keepdim=True)
        B = absA / (sums.clamp(min=1e-8) if clamp else sums)
    elif normalise == "cols":
        B = absA / absA.sum(dim=0, keepdim=True).clamp(min=1e-8)
    elif normalise == "row_max":
        B = absA / absA.amax(dim=1, keepdim=True).clamp(min=1e-8)
    elif normalise == "abs_after":
        B = (A / A.sum(dim=1, keepdim=True).clamp(min=1e-8)).abs()
    else:
        B = absA
    v = torch.zeros(A.shape[0])
    if logits_first:
        v[: len(logit_weights)] = logit_weights
    else:
        v[-len(logit_weights) :] = logit_weights
    total = v.clone() if k0 else torch.zeros_like(v)
    for _ in range(n_layers + 1 if terms is None else terms):
        v = v @ B if left else B @ v
        total += v
    return total


@mutant("compute_influence", "k = 0")
def influence_with_k0(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers, k0=True)


@mutant("compute_influence", "too few power-series terms")
def influence_too_few_terms(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers, terms=n_layers)


@mutant("compute_influence", "did not normalise")
def influence_not_normalised(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers, normalise="none")


@mutant("compute_influence", "absolute values")
def influence_signed(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers, normalise="signed")


@mutant("compute_influence", "normalised columns")
def influence_columns(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers, normalise="cols")


@mutant("compute_influence", "v @ B, not B @ v")
def influence_wrong_direction(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers, left=False)


@mutant("compute_influence", "LAST n_logit nodes")
def influence_logits_first(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers, logits_first=True)


@mutant("compute_influence", "NaN")
def influence_divides_by_zero(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers, clamp=False)


@mutant("compute_influence", "changed its input adjacency_matrix in place")
def influence_in_place_abs(adjacency_matrix, logit_weights, n_layers):
    adjacency_matrix.abs_()  # saves memory, but the caller's matrix loses its signs
    return _influence(adjacency_matrix, logit_weights, n_layers)


@alternative("compute_influence")
def influence_power_series(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers)


@alternative("compute_influence")
def influence_triangular_solve(adjacency_matrix, logit_weights, n_layers):
    """x (I - B) = w B, with I - B unit lower triangular: no series at all."""
    B = S.normalize_matrix(adjacency_matrix).double()
    w = torch.zeros(B.shape[0], dtype=B.dtype)
    w[-len(logit_weights) :] = logit_weights.double()
    I_minus_B = torch.eye(B.shape[0], dtype=B.dtype) - B
    x = torch.linalg.solve_triangular(I_minus_B, (w @ B).unsqueeze(0), upper=False, left=False)
    return x.squeeze(0).to(adjacency_matrix.dtype)


@alternative("compute_influence")
def influence_until_nilpotent(adjacency_matrix, logit_weights, n_layers):
    """Keep multiplying until nothing is left (B is nilpotent), ignoring n_layers."""
    B = S.normalize_matrix(adjacency_matrix)
    v = F.pad(logit_weights, (adjacency_matrix.shape[0] - len(logit_weights), 0))
    total = torch.zeros_like(v)
    while v.abs().sum() > 0:
        v = v @ B
        total = total + v
    return total


# Issue 21: mistakes whose message only said where values differ.


@mutant("compute_influence", "by its largest entry")
def influence_rows_by_max(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers, normalise="row_max")


@mutant("compute_influence", "absolute values after normalising")
def influence_abs_after_normalising(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers, normalise="abs_after")


@mutant("compute_influence", "weight 1 on every logit node")
def influence_uniform_logits(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, torch.ones_like(logit_weights), n_layers)


@mutant("compute_influence", "kept only the last power")
def influence_last_power_only(adjacency_matrix, logit_weights, n_layers):
    B = S.normalize_matrix(adjacency_matrix)
    v = F.pad(logit_weights, (adjacency_matrix.shape[0] - len(logit_weights), 0))
    return v @ torch.linalg.matrix_power(B, n_layers + 1)


@mutant("compute_influence", "you summed 1 power;")
def influence_direct_edges_only(adjacency_matrix, logit_weights, n_layers):
    return _influence(adjacency_matrix, logit_weights, n_layers, terms=1)


# ==================================================================================================
# prune_nodes
# ==================================================================================================


def _prune_nodes(
    A,
    w,
    n_layers,
    threshold=0.8,
    *,
    keep_logits=True,
    sort=True,
    shift=0,
    strict=False,
    ascending=False,
    rows_only=False,
    over_all=False,
):
    n, n_logits = A.shape[0], len(w)
    influence = S.compute_influence(A, w, n_layers)
    scores = influence if over_all else influence[:-n_logits]
    order = scores.argsort(descending=not ascending)
    cum = scores[order].cumsum(0) / scores.sum()
    n_keep = int((cum <= threshold).sum() if strict else (cum < threshold).sum()) + 1 + shift
    kept = order[: min(n_keep, len(order))]
    if keep_logits and not over_all:
        kept = torch.cat([kept, torch.arange(n - n_logits, n)])
    if sort:
        kept = kept.sort().values
    return kept, (A[kept] if rows_only else A[kept][:, kept])


@mutant("prune_nodes", "logit nodes must always be kept")
def prune_nodes_drops_logits(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    return _prune_nodes(adjacency_matrix, logit_weights, n_layers, threshold, keep_logits=False)


@mutant("prune_nodes", "logit nodes must always be kept")
def prune_nodes_threshold_over_all_nodes(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    return _prune_nodes(adjacency_matrix, logit_weights, n_layers, threshold, over_all=True)


@mutant("prune_nodes", "should be sorted")
def prune_nodes_unsorted(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    return _prune_nodes(adjacency_matrix, logit_weights, n_layers, threshold, sort=False)


@mutant("prune_nodes", "one node short")
def prune_nodes_one_short(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    return _prune_nodes(adjacency_matrix, logit_weights, n_layers, threshold, shift=-1)


@mutant("prune_nodes", "exact tie")
def prune_nodes_strict_at_tie(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    return _prune_nodes(adjacency_matrix, logit_weights, n_layers, threshold, strict=True)


@mutant("prune_nodes", "least influential")
def prune_nodes_ascending(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    return _prune_nodes(adjacency_matrix, logit_weights, n_layers, threshold, ascending=True)


@mutant("prune_nodes", "restrict both rows and columns")
def prune_nodes_rows_only(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    return _prune_nodes(adjacency_matrix, logit_weights, n_layers, threshold, rows_only=True)


@mutant("prune_nodes", "should be a 1-D integer tensor, got a list")
def prune_nodes_returns_list(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    kept, pruned = _prune_nodes(adjacency_matrix, logit_weights, n_layers, threshold)
    return kept.tolist(), pruned


@alternative("prune_nodes")
def prune_nodes_seed_style(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    return _prune_nodes(adjacency_matrix, logit_weights, n_layers, threshold)


@alternative("prune_nodes")
def prune_nodes_topk_searchsorted(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    n, n_logits = adjacency_matrix.shape[0], len(logit_weights)
    influence = S.compute_influence(adjacency_matrix, logit_weights, n_layers)[: n - n_logits]
    values, order = influence.topk(n - n_logits)
    cum = values.cumsum(0) / values.sum()
    n_keep = int(torch.searchsorted(cum, torch.tensor([threshold], dtype=cum.dtype))) + 1
    keep = set(order[:n_keep].tolist()) | set(range(n - n_logits, n))
    kept = torch.tensor(sorted(keep))
    return kept, adjacency_matrix[kept[:, None], kept[None, :]]


# Issue 21: mistakes whose message only listed the nodes that differ.


@mutant("prune_nodes", "direct edge weights")
def prune_nodes_by_edge_weight(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    n, n_logits = adjacency_matrix.shape[0], len(logit_weights)
    score = adjacency_matrix.abs().sum(0)[: n - n_logits]
    order = score.argsort(descending=True)
    n_keep = int((score[order].cumsum(0) / score.sum() < threshold).sum()) + 1
    kept = torch.cat([order[:n_keep], torch.arange(n - n_logits, n)]).sort().values
    return kept, adjacency_matrix[kept][:, kept]


@mutant("prune_nodes", "fraction of the nodes by count")
def prune_nodes_by_count(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    n, n_logits = adjacency_matrix.shape[0], len(logit_weights)
    influence = S.compute_influence(adjacency_matrix, logit_weights, n_layers)[: n - n_logits]
    order = influence.argsort(descending=True)
    kept = torch.cat([order[: int(threshold * (n - n_logits))], torch.arange(n - n_logits, n)]).sort().values
    return kept, adjacency_matrix[kept][:, kept]


@mutant("prune_nodes", "is transposed: keep A's layout")
def prune_nodes_transposed(adjacency_matrix, logit_weights, n_layers, threshold=0.8):
    kept, pruned = _prune_nodes(adjacency_matrix, logit_weights, n_layers, threshold)
    return kept, pruned.T


# ==================================================================================================
# prune_edges
# ==================================================================================================


def _prune_edges(
    A,
    w,
    n_layers,
    threshold=0.85,
    *,
    add_logits=True,
    by_target=True,
    strict=False,
    orphans=False,
    keep_logits=True,
    zero_dropped=True,
    sort=True,
    norm="rows",
    weighted=True,
    above=False,
):
    n_logits = len(w)
    importance = S.compute_influence(A, w, n_layers)
    if add_logits:
        importance[-n_logits:] += w
    B = {
        "rows": lambda: S.normalize_matrix(A),
        "signed": lambda: A / A.abs().sum(dim=1, keepdim=True).clamp(min=1e-8),
        "none": lambda: A.abs(),
    }[norm]()
    if not weighted:
        importance = torch.ones_like(importance)
    scores = B * (importance[:, None] if by_target else importance[None, :])
    flat = scores.flatten().sort(descending=True).values
    cum = flat.cumsum(0) / flat.sum()
    cut = flat[(cum > threshold).long().argmax() if strict else (cum >= threshold).long().argmax()]
    mask = scores > cut if above else scores >= cut
    edges = A * mask
    alive = (edges != 0).any(0) | (edges != 0).any(1)
    if keep_logits:
        alive[-n_logits:] = True
    kept = torch.arange(A.shape[0]) if orphans else torch.where(alive)[0]
    if not sort:
        kept = kept.flip(0)
    M = edges if zero_dropped else A
    return kept, M[kept][:, kept]


@mutant("prune_edges", "add the logit weights")
def prune_edges_no_logit_weights(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    return _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold, add_logits=False)


@mutant("prune_edges", "orphans")
def prune_edges_keeps_orphans(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    return _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold, orphans=True)


@mutant("prune_edges", "logit nodes must always be kept")
def prune_edges_drops_logits(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    return _prune_edges(
        adjacency_matrix, logit_weights, n_layers, threshold, add_logits=False, keep_logits=False
    )


@mutant("prune_edges", "TARGET's importance")
def prune_edges_scored_by_source(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    return _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold, by_target=False)


@mutant("prune_edges", "Zero out the edges you drop")
def prune_edges_keeps_dropped_weights(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    return _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold, zero_dropped=False)


@mutant("prune_edges", "exact tie")
def prune_edges_strict_at_tie(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    return _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold, strict=True)


@mutant("prune_edges", "scores >= cutoff: with > you drop")
def prune_edges_strictly_above_the_cutoff(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    """Issue 27: `>` for `>=` got only "differs"."""
    return _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold, above=True)


@mutant("prune_edges", "should be sorted")
def prune_edges_unsorted(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    return _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold, sort=False)


@alternative("prune_edges")
def prune_edges_seed_style(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    return _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold)


@alternative("prune_edges")
def prune_edges_topk(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    """Keep exactly the k best edges (torch.topk), k the fewest that reach the threshold."""
    n, n_logits = adjacency_matrix.shape[0], len(logit_weights)
    importance = S.compute_influence(adjacency_matrix, logit_weights, n_layers)
    importance = importance + F.pad(logit_weights, (n - n_logits, 0))
    scores = (S.normalize_matrix(adjacency_matrix) * importance[:, None]).flatten()
    values, idx = scores.topk(scores.numel())
    k = int(((values.cumsum(0) / values.sum()) < threshold).sum()) + 1
    mask = torch.zeros(n * n, dtype=torch.bool)
    mask[idx[:k]] = True
    edges = adjacency_matrix * mask.view(n, n)
    alive = (edges != 0).any(0) | (edges != 0).any(1)
    alive[n - n_logits :] = True
    kept = alive.nonzero().flatten()
    return kept, edges[kept][:, kept]


# Issue 21: mistakes whose message only listed the nodes that differ.


@mutant("prune_edges", "not the signed ones")
def prune_edges_signed_scores(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    return _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold, norm="signed")


@mutant("prune_edges", "not by |A| itself")
def prune_edges_unnormalised(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    return _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold, norm="none")


@mutant("prune_edges", "weight each edge's normalised weight by its target's importance")
def prune_edges_unweighted(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    return _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold, weighted=False)


@mutant("prune_edges", "is transposed: keep A's layout")
def prune_edges_transposed(adjacency_matrix, logit_weights, n_layers, threshold=0.85):
    kept, pruned = _prune_edges(adjacency_matrix, logit_weights, n_layers, threshold)
    return kept, pruned.T


# ==================================================================================================
# run_with_latent_set (interventions)
# ==================================================================================================


def _latent_set(
    model,
    transcoder,
    tokens,
    position,
    latent,
    value,
    *,
    hook="out",
    where="position",
    read_at=0,
    add=False,
    error="held",
    cleanup=True,
    edit="set",
):
    """A learner's answer in the notebook's style; keyword switches reproduce one mistake each."""
    read, write = transcoder.cfg.metadata.hook_name, transcoder.cfg.metadata.hook_name_out
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=read)
        x = cache[read][0, position]
        clean = transcoder.encode(cache[read][0, position + read_at])[latent]
        direction = transcoder.W_enc[:, latent] if edit == "encoder" else transcoder.W_dec[latent]
        change = (value if add else value - clean) * direction
        if edit == "negated":
            change = -change
        elif edit == "with_b_dec":
            change = change + transcoder.b_dec
    name = {"out": write, "in": read, "resid_mid": write.replace("hook_mlp_out", "hook_resid_mid")}[hook]
    pos = {"position": position, "all": slice(None), "next": position + 1, "onwards": slice(position, None)}[
        where
    ]

    def hook_fn(act, hook):
        act = act.clone()
        if error == "recomputed":  # the error re-derived from the edited transcoder output absorbs the edit
            acts = transcoder.encode(x)
            acts[latent] = value
            new = transcoder.decode(acts) + x @ transcoder.W_skip.T
            act[:, position] = new + (act[:, position] - new)
        elif error == "dropped":
            acts = transcoder.encode(x)
            acts[latent] = value
            act[:, position] = transcoder.decode(acts) + x @ transcoder.W_skip.T
        else:
            act[:, pos] += change
        return act

    with torch.no_grad():
        if not cleanup:
            model.add_hook(name, hook_fn)
            return model(tokens)
        with model.hooks(fwd_hooks=[(name, hook_fn)]):
            return model(tokens)


@mutant("run_with_latent_set", "to SET the activation, add the difference")
def latent_set_adds_value(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, add=True)


@mutant("run_with_latent_set", "clean activation a at the position before")
def latent_set_reads_the_clean_activation_one_before(model, transcoder, tokens, position, latent, value):
    """Issue 21: was told "you add value * W_dec[latent]", which is not what it does."""
    return _latent_set(model, transcoder, tokens, position, latent, value, read_at=-1)


@mutant("run_with_latent_set", "you read the latent's clean activation a at the last position")
def latent_set_reads_the_clean_activation_at_the_last_position(
    model, transcoder, tokens, position, latent, value
):
    """Issue 27: led with "you add value * W_dec[latent]" before the real cause."""
    return _latent_set(
        model, transcoder, tokens, position, latent, value, read_at=tokens.shape[1] - 1 - position
    )


@mutant("run_with_latent_set", "at every position")
def latent_set_every_position(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, where="all")


@mutant("run_with_latent_set", "wrong position")
def latent_set_next_position(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, where="next")


@mutant("run_with_latent_set", "you edit the MLP's input")
def latent_set_at_mlp_in(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, hook="in")


@mutant("run_with_latent_set", "hook_resid_mid")
def latent_set_at_resid_mid(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, hook="resid_mid")


@mutant("run_with_latent_set", "your change cancels out")
def latent_set_recomputes_error(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, error="recomputed")


@mutant("run_with_latent_set", "drops the error")
def latent_set_drops_error(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, error="dropped")


@mutant("run_with_latent_set", "left 1 hook on the model")
def latent_set_leaves_hook(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, cleanup=False)


@alternative("run_with_latent_set")
def latent_set_reference(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value)


@alternative("run_with_latent_set")
def latent_set_in_one_pass(model, transcoder, tokens, position, latent, value):
    """Reads the clean activation from the live MLP input of the same pass (nothing upstream has changed)."""
    seen = {}

    def read(x, hook):
        seen["a"] = transcoder.encode(x[0, position])[latent]

    def write(mlp_out, hook):
        return mlp_out + F.pad(
            ((value - seen["a"]) * transcoder.W_dec[latent])[None],
            (0, 0, position, mlp_out.shape[1] - position - 1),
        )

    hooks = [(transcoder.cfg.metadata.hook_name, read), (transcoder.cfg.metadata.hook_name_out, write)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return model(tokens)


# Issue 21: mistakes whose message only said where the logits differ.


@mutant("run_with_latent_set", "your change has the wrong sign")
def latent_set_negated_change(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, edit="negated")


@mutant("run_with_latent_set", "to the end of the sequence")
def latent_set_from_position_on(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, where="onwards")


@mutant("run_with_latent_set", "along the encoder direction")
def latent_set_along_encoder(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, edit="encoder")


@mutant("run_with_latent_set", "you added b_dec with the change")
def latent_set_adds_b_dec(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value, edit="with_b_dec")


@mutant("run_with_latent_set", "return the logits at every position")
def latent_set_last_position_only(model, transcoder, tokens, position, latent, value):
    return _latent_set(model, transcoder, tokens, position, latent, value)[:, -1:]


# ==================================================================================================
# predicted_effects (interventions)
# ==================================================================================================


def _effects(result, node_indices, *, divide=True, steps=None, total=True, rows=False, absolute=False):
    A, nodes = result.adjacency_matrix, result.graph.nodes
    A = A.abs() if absolute else A
    idx = list(node_indices)
    gain = torch.zeros(A.shape[0], dtype=A.dtype)
    for u, n in enumerate(nodes):
        if n.node_type == NodeType.LATENT:
            gain[u] = 1 / n.activation if divide else 1.0
    M = gain[:, None] * A if rows else A * gain
    direct = A[:, idx]
    if not total:
        return direct.T, direct.T
    if steps is None:
        out = torch.linalg.solve(torch.eye(A.shape[0], dtype=A.dtype) - M, direct)
    else:
        out, term = direct.clone(), direct
        for _ in range(steps):
            term = M @ term
            out = out + term
    return direct.T, out.T


@mutant("predicted_effects", "you used result.pruned_matrix")
def effects_on_the_pruned_matrix(result, node_indices):
    """Issue 27: the kept nodes' matrix; once an AttributeError about the test's stand-in object."""
    A, nodes = result.pruned_matrix, result.kept_nodes
    gain = torch.tensor(
        [1 / n.activation if n.node_type == NodeType.LATENT else 0.0 for n in nodes], dtype=A.dtype
    )
    direct = A[:, list(node_indices)]
    total = torch.linalg.solve(torch.eye(A.shape[0], dtype=A.dtype) - A * gain, direct)
    return direct.T, total.T


@mutant("predicted_effects", "your total effect is the direct effect")
def effects_total_is_direct(result, node_indices):
    return _effects(result, node_indices, total=False)


@mutant("predicted_effects", "(I - M.T) with upper=False leaves only the identity")
def effects_transposed_lower_solve(result, node_indices):
    """Issue 21: M.T with a lower-triangular solve; was told only that the total is the direct effect."""
    A, nodes = result.adjacency_matrix, result.graph.nodes
    gain = torch.tensor(
        [1 / n.activation if n.node_type == NodeType.LATENT else 0.0 for n in nodes], dtype=A.dtype
    )
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    idx = list(node_indices)
    total = torch.linalg.solve_triangular(eye - (A * gain).T, A[:, idx], upper=False, unitriangular=True)
    return A[:, idx].T, total.T


@mutant("predicted_effects", "you used M.T")
def effects_transposed(result, node_indices):
    A, nodes = result.adjacency_matrix, result.graph.nodes
    gain = torch.tensor(
        [1 / n.activation if n.node_type == NodeType.LATENT else 0.0 for n in nodes], dtype=A.dtype
    )
    idx = list(node_indices)
    total = torch.linalg.solve(torch.eye(A.shape[0], dtype=A.dtype) - (A * gain).T, A[:, idx])
    return A[:, idx].T, total.T


@mutant("predicted_effects", "divide each latent's column of A by its activation")
def effects_not_divided(result, node_indices):
    return _effects(result, node_indices, divide=False)


@mutant("predicted_effects", "multiplied the latent columns by the activations")
def effects_times_activation(result, node_indices):
    A, nodes = result.adjacency_matrix, result.graph.nodes
    acts = torch.tensor(
        [n.activation if n.node_type == NodeType.LATENT else 0.0 for n in nodes], dtype=A.dtype
    )
    total = torch.linalg.solve(torch.eye(A.shape[0], dtype=A.dtype) - A * acts, A[:, list(node_indices)])
    return A[:, list(node_indices)].T, total.T


@mutant("predicted_effects", "paths of one or two edges only")
def effects_one_step(result, node_indices):
    return _effects(result, node_indices, steps=1)


@mutant("predicted_effects", "one row per source")
def effects_columns(result, node_indices):
    direct, total = _effects(result, node_indices)
    return direct.T, total.T


@alternative("predicted_effects")
def effects_looped(result, node_indices):
    """Node by node in graph order: each latent's change passes on to everything after it."""
    A, nodes = result.adjacency_matrix, result.graph.nodes
    direct = A[:, list(node_indices)].T
    total = torch.zeros_like(direct)
    for j, s in enumerate(node_indices):
        x = A[:, s].clone()
        for u, n in enumerate(nodes):  # u's change is final once every earlier node's is
            if n.node_type == NodeType.LATENT and u != s:
                x[u + 1 :] += A[u + 1 :, u] * x[u] / n.activation
        total[j] = x
    return direct, total


@alternative("predicted_effects")
def effects_neumann(result, node_indices):
    """The closed form as a Neumann series: a path passes through at most one latent per layer."""
    return _effects(result, node_indices, steps=result.graph.n_layers)


@alternative("predicted_effects")
def effects_triangular(result, node_indices):
    """A is strictly lower triangular in node order: a unit-triangular solve."""
    A, nodes = result.adjacency_matrix, result.graph.nodes
    gain = torch.tensor(
        [1 / n.activation if n.node_type == NodeType.LATENT else 0.0 for n in nodes], dtype=A.dtype
    )
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    total = torch.linalg.solve_triangular(
        eye - A * gain, A[:, list(node_indices)], upper=False, unitriangular=True
    )
    return A[:, list(node_indices)].T, total.T


# Issue 21: mistakes whose message only said where values differ.


@mutant("predicted_effects", "you divided the ROWS of A")
def effects_rows_divided(result, node_indices):
    return _effects(result, node_indices, rows=True)


@mutant("predicted_effects", "counts the source's own change")
def effects_with_source(result, node_indices):
    direct, total = _effects(result, node_indices)
    return direct, total + torch.eye(total.shape[1], dtype=total.dtype)[list(node_indices)]


@mutant("predicted_effects", "you took the source's ROW of A")
def effects_direct_from_rows(result, node_indices):
    _, total = _effects(result, node_indices)
    return result.adjacency_matrix[list(node_indices)], total


@mutant("predicted_effects", "you took |A|")
def effects_absolute(result, node_indices):
    return _effects(result, node_indices, absolute=True)


# ==================================================================================================
# strongest_path (case study)
# ==================================================================================================


def _no_direct(B, kinds):
    """B without the edges from embeddings straight to logits."""
    for t, kt in enumerate(kinds):
        for s, ks in enumerate(kinds):
            if str(getattr(kt, "value", kt)) == "logit" and str(getattr(ks, "value", ks)) == "embedding":
                B[t, s] = 0
    return B


def _path(
    result,
    *,
    direct=False,
    weights="shares",
    start=("embedding",),
    end="top",
    order="forward",
    local=False,
    strength=None,
    sweeps=None,
    renormalise=False,
):
    """The notebook's dynamic programme, written by a learner; switches reproduce one mistake each."""
    A = result.pruned_matrix.double()
    kept = result.kept_indices.tolist()
    kinds = [result.graph.nodes[i].node_type.value for i in kept]
    if weights == "shares":
        B = A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-12)
    elif weights == "raw":
        B = A.abs()
    elif weights == "signed":
        B = A / A.abs().sum(1, keepdim=True).clamp(min=1e-12)
    elif weights == "columns":
        B = A.abs() / A.abs().sum(0, keepdim=True).clamp(min=1e-12)
    else:  # "shares_transposed"
        B = (A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-12)).T
    if not direct:
        B = _no_direct(B, kinds)
    if renormalise:  # shares recomputed without the direct edges
        B = B / B.sum(1, keepdim=True).clamp(min=1e-12)
    is_input = torch.tensor([k in start for k in kinds])
    best = is_input.double()
    for _ in range(len(kept) if sweeps is None else sweeps(result)):
        via, parent = (B * best).max(1)
        best = torch.where(is_input, best, via)
    t = kinds.index("logit") if end == "top" else len(kept) - 1
    path = [t]
    while not is_input[path[-1]]:
        path.append(int(parent[path[-1]]))
    if order == "forward":
        path = path[::-1]
    value = float(best[t])
    if strength == "raw":
        value = float(torch.tensor([A[b, a].abs() for a, b in zip(path, path[1:])]).prod())
    return (path if local else [kept[k] for k in path]), value


@mutant("strongest_path", "greedy is not optimal")
def path_greedy(result):
    """From the logit, step back along the strongest incoming edge until an embedding."""
    A = result.pruned_matrix
    kept = result.kept_indices.tolist()
    kinds = [result.graph.nodes[i].node_type for i in kept]
    B = A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-12)
    B = _no_direct(B, kinds)
    t = kinds.index(NodeType.LOGIT)
    path, strength = [t], 1.0
    while kinds[path[-1]] != NodeType.EMBEDDING:
        s = int(B[path[-1]].argmax())
        strength *= float(B[path[-1], s])
        path.append(s)
    return [kept[k] for k in path[::-1]], strength


@mutant("strongest_path", "a direct edge from an embedding to the logit")
def path_keeps_direct_edges(result):
    return _path(result, direct=True)


@mutant("strongest_path", "normalise first")
def path_raw_weights(result):
    return _path(result, weights="raw")


@mutant("strongest_path", "take absolute values")
def path_signed_weights(result):
    return _path(result, weights="signed")


@mutant("strongest_path", "normalise each ROW")
def path_column_shares(result):
    return _path(result, weights="columns")


@mutant("strongest_path", "product of its edges' normalised weights")
def path_summed(result):
    A = result.pruned_matrix.double()
    kept = result.kept_indices.tolist()
    kinds = [result.graph.nodes[i].node_type for i in kept]
    B = _no_direct(A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-12), kinds)
    is_input = torch.tensor([k == NodeType.EMBEDDING for k in kinds])
    best = torch.where(is_input, 0.0, float("-inf")).double()
    for _ in range(len(kept)):
        via, parent = torch.where(B > 0, B + best, torch.tensor(float("-inf"))).max(1)
        best = torch.where(is_input, best, via)
    path = [kinds.index(NodeType.LOGIT)]
    while not is_input[path[-1]]:
        path.append(int(parent[path[-1]]))
    return [kept[k] for k in path[::-1]], float(best[path[0]])


@mutant("strongest_path", "runs from the logit back to the input")
def path_reversed(result):
    return _path(result, order="backward")


@mutant("strongest_path", "map each one through result.kept_indices")
def path_local_indices(result):
    return _path(result, local=True)


@mutant("strongest_path", "start at an input token")
def path_from_any_source(result):
    return _path(result, start=("embedding", "mlp_error"))


@mutant("strongest_path", "not the top logit")
def path_to_last_logit(result):
    return _path(result, end="last")


@mutant("strongest_path", "A is target by source")
def path_transposed(result):
    """Reads A as source by target: B.T where B is needed."""
    return _path(result, weights="shares_transposed")


@mutant("strongest_path", "not of raw |A|")
def path_raw_strength(result):
    return _path(result, strength="raw")


@mutant("strongest_path", "your sweeps stopped before")
def path_stops_after_n_layers(result):
    """Issue 27: was told to return the product of the normalised weights (the formula was right)."""
    return _path(result, sweeps=lambda r: r.graph.n_layers)


@mutant("strongest_path", "renormalised")
def path_renormalised_without_direct_edges(result):
    """Issue 27: was told to return the product of the normalised weights."""
    return _path(result, renormalise=True)


@mutant("strongest_path", "changed its input result.pruned_matrix in place")
def path_normalises_in_place(result):
    """Issue 27: normalises the learner's input in place, then answers right: passed."""
    A = result.pruned_matrix
    A.abs_().div_(A.sum(1, keepdim=True).clamp(min=1e-12))
    return _path(result)


@mutant("strongest_path", "the strength is nan")
def path_nan_strength(result):
    path, _ = _path(result)
    return path, float("nan")


@mutant("strongest_path", "the path runs in the pruned graph")
def path_on_the_full_adjacency(result):
    """Issue 27: the full matrix over all nodes; once an AttributeError about the test's stand-in object."""
    A = result.adjacency_matrix.double()
    kinds = [node.node_type.value for node in result.graph.nodes]
    B = _no_direct(A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-12), kinds)
    is_input = torch.tensor([k == "embedding" for k in kinds])
    best = is_input.double()
    for _ in range(len(kinds)):
        via, parent = (B * best).max(1)
        best = torch.where(is_input, best, via)
    path = [kinds.index("logit")]
    while not is_input[path[-1]]:
        path.append(int(parent[path[-1]]))
    return path[::-1], float(best[path[0]])


@alternative("strongest_path")
def path_reference_style(result):
    return _path(result)


@alternative("strongest_path", note="updates one node at a time in a Python loop")
def path_node_by_node(result):
    """A loop over nodes in graph order (a topological order: edges only go forward)."""
    A = result.pruned_matrix
    kept = result.kept_indices.tolist()
    kinds = [result.graph.nodes[i].node_type for i in kept]
    B = _no_direct(A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-8), kinds)
    best = torch.zeros(len(kept), dtype=A.dtype)
    parent = [-1] * len(kept)
    for t, kind in enumerate(kinds):
        if kind == NodeType.EMBEDDING:
            best[t] = 1.0
        elif t > 0:
            candidates = B[t, :t] * best[:t]
            parent[t] = int(candidates.argmax())
            best[t] = candidates[parent[t]]
    t = kinds.index(NodeType.LOGIT)
    path = [t]
    while parent[path[-1]] >= 0:
        path.append(parent[path[-1]])
    return [kept[k] for k in reversed(path)], float(best[t])


@alternative("strongest_path", note="updates one node at a time in a Python loop")
def path_dijkstra(result):
    """Shares are at most 1, so -log(share) >= 0: the strongest path is a shortest path (Dijkstra)."""
    import heapq
    import math

    A = result.pruned_matrix.double()
    kept = result.kept_indices.tolist()
    kinds = [result.graph.nodes[i].node_type for i in kept]
    B = _no_direct(A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-12), kinds)
    out_edges = [
        [(t, -math.log(B[t, s].item())) for t in torch.nonzero(B[:, s]).flatten().tolist()]
        for s in range(len(kept))
    ]
    dist = {s: 0.0 for s, k in enumerate(kinds) if k == NodeType.EMBEDDING}
    prev: dict[int, int] = {}
    heap = [(0.0, s) for s in dist]
    done = set()
    while heap:
        d, s = heapq.heappop(heap)
        if s in done:
            continue
        done.add(s)
        for t, cost in out_edges[s]:
            if d + cost < dist.get(t, math.inf):
                dist[t], prev[t] = d + cost, s
                heapq.heappush(heap, (d + cost, t))
    t = kinds.index(NodeType.LOGIT)
    path = [t]
    while path[-1] in prev:
        path.append(prev[path[-1]])
    return [kept[k] for k in reversed(path)], math.exp(-dist[t])


@alternative("strongest_path")
def path_backward_from_logit(result):
    """The same programme run backwards: the strongest path from each node to the logit, in log space."""
    A = result.pruned_matrix.double()
    kept = result.kept_indices.tolist()
    kinds = [result.graph.nodes[i].node_type for i in kept]
    logB = _no_direct(A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-12), kinds).log()  # -inf: no edge
    end = kinds.index(NodeType.LOGIT)
    to_end = torch.full((len(kept),), float("-inf"), dtype=A.dtype)
    to_end[end] = 0.0
    for _ in range(len(kept)):
        via, step = (logB + to_end[:, None]).max(0)  # over targets t: log B[t, s] + to_end[t]
        to_end = torch.maximum(to_end, via)
        to_end[end] = 0.0
    is_input = torch.tensor([k == NodeType.EMBEDDING for k in kinds])
    start = int(torch.where(is_input, to_end, torch.tensor(float("-inf"), dtype=A.dtype)).argmax())
    path = [start]
    while path[-1] != end:
        path.append(int(step[path[-1]]))
    return [kept[k] for k in path], float(to_end[start].exp())


# ==================================================================================================
# swap_group (case study)
# ==================================================================================================


def _swap(
    model, transcoders, prompt_a, prompt_b, latents, *, source="b", combine="set", where="own", zeros=True
):
    """A learner's swap with `intervene`; switches reproduce one mistake each."""
    acts_a = S.intervene(model, transcoders, prompt_a, []).activations
    acts_b = S.intervene(model, transcoders, prompt_b, []).activations
    edits = []
    for layer, pos, f in latents:
        read = pos if where == "own" else -1
        value = float((acts_b if source == "b" else acts_a)[layer][read, f])
        if combine == "add":
            value += float(acts_a[layer][pos, f])
        if value == 0 and not zeros:
            continue
        edits.append((layer, pos, f, value))
    return S.intervene(model, transcoders, prompt_a, edits).logits[0, -1]


@mutant("swap_group", "you added B's activation to A's own")
def swap_adds(model, transcoders, prompt_a, prompt_b, latents):
    return _swap(model, transcoders, prompt_a, prompt_b, latents, combine="add")


@mutant("swap_group", "values on prompt A")
def swap_keeps_a_values(model, transcoders, prompt_a, prompt_b, latents):
    return _swap(model, transcoders, prompt_a, prompt_b, latents, source="a")


@mutant("swap_group", "must be switched off too")
def swap_skips_silent_latents(model, transcoders, prompt_a, prompt_b, latents):
    return _swap(model, transcoders, prompt_a, prompt_b, latents, zeros=False)


@mutant("swap_group", "at the latent's own position")
def swap_reads_last_position(model, transcoders, prompt_a, prompt_b, latents):
    return _swap(model, transcoders, prompt_a, prompt_b, latents, where="last")


@mutant("swap_group", "you set the latents to 0, which is an ablation")
def swap_ablates(model, transcoders, prompt_a, prompt_b, latents):
    """Issue 27: was told to read B's value at the latent's own position (toy latents are silent at the
    last position, so reading there also gives 0)."""
    edits = [(layer, pos, f, 0.0) for layer, pos, f in latents]
    return S.intervene(model, transcoders, prompt_a, edits).logits[0, -1]


@mutant("swap_group", "use intervene's defaults")
def swap_live_attention(model, transcoders, prompt_a, prompt_b, latents):
    acts_b = S.intervene(model, transcoders, prompt_b, []).activations
    edits = [(layer, pos, f, float(acts_b[layer][pos, f])) for layer, pos, f in latents]
    return S.intervene(model, transcoders, prompt_a, edits, freeze_attention=False).logits[0, -1]


@mutant("swap_group", "return the next-token logits")
def swap_every_position(model, transcoders, prompt_a, prompt_b, latents):
    acts_b = S.intervene(model, transcoders, prompt_b, []).activations
    edits = [(layer, pos, f, float(acts_b[layer][pos, f])) for layer, pos, f in latents]
    return S.intervene(model, transcoders, prompt_a, edits).logits


@alternative("swap_group")
def swap_reference_style(model, transcoders, prompt_a, prompt_b, latents):
    return _swap(model, transcoders, prompt_a, prompt_b, latents)


@alternative("swap_group")
def swap_values_by_encoding(model, transcoders, prompt_a, prompt_b, latents):
    """B's values straight from the transcoders' encoders on a cached run of B."""
    names = [transcoders[layer].cfg.metadata.hook_name for layer, _, _ in latents]
    _, cache = model.run_with_cache(prompt_b, names_filter=lambda name: name in names)
    edits = []
    for layer, pos, f in latents:
        tc = transcoders[layer]
        edits.append((layer, pos, f, tc.encode(cache[tc.cfg.metadata.hook_name])[0, pos, f].item()))
    return S.intervene(model, transcoders, prompt_a, edits).logits[0, -1]


@alternative("swap_group")
def swap_with_clean_runs(model, transcoders, prompt_a, prompt_b, latents):
    """Both clean passes kept (clean_run), B's read off it, A's reused by intervene."""
    from part3_attribution_graphs.interventions import clean_run

    run_a, run_b = clean_run(model, transcoders, prompt_a), clean_run(model, transcoders, prompt_b)
    edits = [(layer, pos, f, run_b.acts[layer][pos, f].item()) for layer, pos, f in latents]
    return S.intervene(model, transcoders, run_a, edits).logits[0, -1]


def catalogue_by_exercise() -> dict[str, tuple[list[Mutant], list[Mutant]]]:
    """{exercise: (mutants, alternatives)}."""
    out: dict[str, tuple[list[Mutant], list[Mutant]]] = {}
    for m in MUTANTS:
        out.setdefault(m.exercise, ([], []))[0].append(m)
    for m in ALTERNATIVES:
        out.setdefault(m.exercise, ([], []))[1].append(m)
    return out
