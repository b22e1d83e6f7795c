"""compute_salient_logits: the top tokens, their probabilities and demeaned unembeddings."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..nodes import (
    compute_salient_logits,
)
from .compare import _close, _diagnose, _float, _int, _items, _tensor, _worst
from .messages import _Fail, _fmt, _short
from .running import _public_test, _run
from .worlds import _World


def _salient_case(fn: Callable, w: _World, logits: Tensor, n: int, label: str) -> None:
    model, d_model = w.model, w.model.cfg.d_model
    exp_vecs, exp_info = compute_salient_logits(model, logits, n)
    exp_ids = [info.token_id for info in exp_info]
    exp_strs = [info.str_token for info in exp_info]
    exp_probs = torch.tensor([info.prob for info in exp_info], dtype=torch.float64)
    given = logits.clone()
    out = _run(
        fn,
        model,
        given,
        n,
        what="compute_salient_logits",
        hints=[
            (
                IndexError,
                "",
                "W_U is (d_model, d_vocab): a token's unembedding is the column W_U[:, token_id], and the "
                "mean over the vocabulary is W_U.mean(dim=-1)",
            )
        ],
    )
    vecs, info = _items(out, 2, "compute_salient_logits")
    vecs = _tensor(vecs, f"reading_vecs{label}", shape=(n, d_model), device=w.device)
    if not isinstance(info, (list, tuple)) or len(info) != n:
        raise _Fail(
            f"top_token_info{label} should be a list of {n} SalientToken(str_token, prob, token_id), "
            f"got {_short(repr(info), 120)}."
        )
    strs, probs = [], []
    for item in info:
        # A bare (str, prob) pair gets through to the last check, so that other mistakes are named first.
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise _Fail(
                f"Each entry of top_token_info should be a SalientToken(str_token, prob, token_id), "
                f"got {item!r}."
            )
        if not isinstance(item[0], str):
            raise _Fail(
                f"Token strings should be str (model.tokenizer.decode(...)), got {type(item[0]).__name__}."
            )
        strs.append(item[0])
        probs.append(_float(item[1], "Each probability in top_token_info"))
    probs_t = torch.tensor(probs, dtype=torch.float64)

    W_U = model.W_U.detach()
    last = logits[0, -1].detach().double()

    def demeaned(ids: Tensor | list) -> Tensor:
        return (W_U[:, list(ids)] - W_U.mean(dim=-1, keepdim=True)).T

    def top(scores: Tensor, largest: bool = True) -> list[int]:
        return scores.topk(n, largest=largest).indices.tolist()

    # Near-ties (e.g. in bfloat16) may order or pick the top tokens differently: accept any pick whose
    # probabilities match the top ones, and hold the rest of the answer to that pick.
    ref_probs = logits[0, -1].detach().float().softmax(dim=-1)
    by_str = {}
    for i in ref_probs.topk(min(n + 10, ref_probs.numel())).indices.tolist():
        by_str.setdefault(model.tokenizer.decode([i]), i)
    picked = [by_str.get(t) for t in strs]
    if None not in picked and picked != exp_ids and len(set(picked)) == n:
        if _close(ref_probs[picked].double().cpu(), exp_probs, max(w.tol, 1e-5)):
            exp_ids, exp_strs = picked, list(strs)
            exp_probs = ref_probs[picked].double().cpu()
            exp_vecs = (W_U[:, picked] - W_U.mean(dim=-1, keepdim=True)).T

    if not _close(vecs, exp_vecs, w.tol):
        hint = _diagnose(
            vecs,
            [
                (
                    "your reading vectors are not demeaned: subtract W_U.mean(dim=-1), the mean unembedding "
                    "over the vocabulary, from each chosen column",
                    lambda: W_U[:, exp_ids].T,
                ),
                (
                    "you demeaned over the wrong axis: subtract the mean over the vocabulary, "
                    "W_U.mean(dim=-1) (one d_model vector), not the mean over d_model",
                    lambda: (W_U[:, exp_ids] - W_U[:, exp_ids].mean(dim=0)).T,
                ),
                (
                    "subtract the mean over the whole vocabulary, not just over the chosen tokens",
                    lambda: W_U[:, exp_ids].T - W_U[:, exp_ids].T.mean(dim=0),
                ),
                (
                    "you read the prediction at position 0 (logits[0, 0]); the next token is predicted at "
                    "the last position: use logits[0, -1]",
                    lambda: demeaned(top(logits[0, 0].double())),
                ),
                (
                    "you read the prediction one position before the last (logits[0, -2], off by one?); the "
                    "next token is predicted at the last position: use logits[0, -1]",
                    lambda: demeaned(top(logits[0, -2].double())),
                ),
                (
                    "you subtracted one number, W_U.mean(), the mean of the whole matrix; subtract the mean "
                    "unembedding vector over the vocabulary, W_U.mean(dim=-1) (one value per d_model entry)",
                    lambda: W_U[:, exp_ids].T - W_U.mean(),
                ),
                (
                    "your reading vectors are scaled to unit length; keep the demeaned unembedding as it is "
                    "(its norm sets the logit's scale)",
                    lambda: exp_vecs / exp_vecs.norm(dim=-1, keepdim=True),
                ),
                (
                    "you took the softmax over the wrong dimension: take it over the vocabulary (dim=-1) of "
                    "logits[0, -1]",
                    lambda: demeaned(top(logits.double().softmax(dim=1)[0, -1])),
                ),
                (
                    "you picked the least likely tokens: take the n_output_nodes most probable ones (topk)",
                    lambda: demeaned(top(last, largest=False)),
                ),
                (
                    "the reading vectors come back in a different order: keep the order of decreasing "
                    "probability",
                    lambda: demeaned(sorted(exp_ids)),
                ),
            ],
            w.tol,
        )
        raise _Fail(
            hint
            or f"reading_vecs{label} differ from the demeaned unembeddings W_U[:, v] - W_U.mean(-1) of "
            f"the top tokens {exp_strs}, {_worst(vecs, exp_vecs, 'reading_vecs')}."
        )
    if strs != exp_strs:
        raise _Fail(
            f"The token strings should be model.tokenizer.decode([token_id]) of the chosen tokens, most "
            f"probable first: expected {exp_strs}, got {strs}."
        )
    if not _close(probs_t, exp_probs, max(w.tol, 1e-5)):
        hint = _diagnose(
            probs_t,
            [
                (
                    "you returned logits, not probabilities: apply softmax over the vocabulary",
                    lambda: last[exp_ids],
                ),
                (
                    "you took the softmax over the top n_output_nodes logits only; take it over the whole "
                    "vocabulary first (softmax(logits[0, -1])), then pick the top tokens",
                    lambda: last[exp_ids].softmax(-1),
                ),
                (
                    "you returned log-probabilities: return probabilities (softmax, not log_softmax)",
                    lambda: last.log_softmax(-1)[exp_ids],
                ),
                (
                    "you took the softmax over the wrong dimension: take it over the vocabulary (dim=-1) of "
                    "logits[0, -1]",
                    lambda: logits.double().softmax(dim=1)[0, -1][exp_ids],
                ),
                (
                    "you took the softmax over the wrong dimension (the batch dim makes every probability "
                    "1): use the vocabulary dim, -1",
                    lambda: logits.double().softmax(dim=0)[0, -1][exp_ids],
                ),
            ],
            w.tol,
        )
        raise _Fail(
            hint
            or f"The probabilities{label} should be softmax(logits[0, -1])[token]: expected "
            f"{_fmt(exp_probs)}, got {_fmt(probs_t)}."
        )
    # The token ids: the logit nodes, the dashboard and the Neuronpedia export identify each output by its id.
    for item, exp_id in zip(info, exp_ids):
        if len(item) != 3:
            raise _Fail(
                f"Return each token as SalientToken(str_token, prob, token_id), not the pair "
                f"{item!r}: the logit nodes take their token id from it, and the exports name each "
                "output by it."
            )
        token_id = _int(item[2], f"The token_id of {item[0]!r}")
        if token_id != exp_id:
            raise _Fail(
                f"The token_id of {item[0]!r} should be its index in the vocabulary, {exp_id} (an "
                f"index from topk), got {token_id}."
            )


@_public_test("compute_salient_logits")
def test_compute_salient_logits(fn: Callable, w: _World) -> None:
    """Top tokens at the last position, their probabilities and demeaned unembeddings."""
    _salient_case(fn, w, w.logits, 3, "")
    _salient_case(fn, w, w.logits, 1, " (n_output_nodes=1)")
    gen = torch.Generator().manual_seed(0)
    made = (4 * torch.randn(1, 6, w.model.cfg.d_vocab, generator=gen)).to(w.logits.device)  # float32: no ties
    _salient_case(fn, w, made, 5, " (hand-made logits, n_output_nodes=5)")
