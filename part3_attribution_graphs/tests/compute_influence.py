"""compute_influence: the Neumann series on the row-normalised |A|."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..pruning import compute_influence, normalize_matrix
from .compare import _close, _diagnose, _tensor, _worst
from .handmade import _chain, _two_logit_graph, _zero_row_graph
from .messages import _Fail
from .running import _public_test, _run
from .worlds import _World


def _influence_variant(
    A: Tensor,
    w: Tensor,
    n_layers: int,
    *,
    terms: int | None = None,
    k0: bool = False,
    norm: str = "rows",
    last_only: bool = False,
    start: Tensor | None = None,
) -> Tensor:
    """compute_influence, with the usual mistakes switchable."""
    A = A.double()
    if norm == "rows":
        B = normalize_matrix(A)
    elif norm == "cols":
        B = A.abs() / A.abs().sum(0, keepdim=True).clamp(min=1e-8)
    elif norm == "signed":
        B = A / A.sum(1, keepdim=True).clamp(min=1e-8)
    elif norm == "abs_after":
        B = (A / A.sum(1, keepdim=True).clamp(min=1e-8)).abs()
    elif norm == "row_max":
        B = A.abs() / A.abs().amax(1, keepdim=True).clamp(min=1e-8)
    else:
        B = A.abs()
    v = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device)
    v[A.shape[0] - w.shape[0] :] = w.double() if start is None else start.double()
    total = v.clone() if k0 else torch.zeros_like(v)
    for _ in range(n_layers + 1 if terms is None else terms):
        v = v @ B
        total = v if last_only else total + v
    return total


def _influence_case(fn: Callable, A: Tensor, w: Tensor, n_layers: int, tol: float, label: str) -> None:
    A_in, w_in = A.clone(), w.clone()
    out = _run(fn, A_in, w_in, n_layers, what="compute_influence")
    got = _tensor(
        out,
        f"The influence{label}",
        shape=(A.shape[0],),
        device=A.device,
        nan_hint="A node with no inputs has an all-zero row of A: clamp the row sums before dividing, as "
        "normalize_matrix does.",
    )
    expected = compute_influence(A, w, n_layers)
    if _close(got, expected, tol):
        return
    if got.abs().max() == 0:
        # Both mistakes give exactly zero on any graph whose first nodes have no inputs and whose logits feed
        # nothing.
        # Where no path has the full n_layers + 1 edges, the last power alone is zero too.
        last_only = _influence_variant(A, w, n_layers, last_only=True).abs().max() == 0
        raise _Fail(
            f"Your influence{label} is all zeros: put the logit weights on the LAST n_logit nodes (the logit "
            "nodes come last) and propagate from targets back to sources with v @ B, not B @ v."
            + (
                " Or you kept only the last power v @ B^(n_layers+1), which is zero here: sum every power."
                if last_only
                else ""
            )
        )
    hint = _diagnose(
        got.double().cpu(),
        [
            (
                "you included the starting vector (the k = 0 term of the series), so logit nodes get their "
                "own weight: start the sum at v @ B",
                lambda: _influence_variant(A, w, n_layers, k0=True),
            ),
            (
                "too few power-series terms: sum n_layers + 1 powers, v @ B + v @ B^2 + ... + v @ "
                "B^(n_layers+1), since a path can have n_layers + 1 edges (embedding -> layer 0 -> ... -> "
                "logit)",
                lambda: _influence_variant(A, w, n_layers, terms=n_layers),
            ),
            (
                "too few power-series terms: sum n_layers + 1 powers",
                lambda: _influence_variant(A, w, n_layers, terms=n_layers - 1),
            ),
            *(
                (
                    f"too few power-series terms: you summed {k} power{'s' if k > 1 else ''}; sum "
                    f"n_layers + 1 = {n_layers + 1} powers, v @ B + ... + v @ B^(n_layers+1), since a path "
                    "can have n_layers + 1 edges",
                    lambda k=k: _influence_variant(A, w, n_layers, terms=k),
                )
                for k in range(1, n_layers - 1)
            ),
            (
                "you kept only the last power v @ B^(n_layers+1); sum every power, v @ B + v @ B^2 + ... "
                "(paths of every length count)",
                lambda: _influence_variant(A, w, n_layers, last_only=True),
            ),
            (
                "you started from weight 1 on every logit node; start from the logit weights (each "
                "logit's probability), v[-n_logits:] = logit_weights",
                lambda: _influence_variant(A, w, n_layers, start=torch.ones_like(w)),
            ),
            (
                "you divided each row of |A| by its largest entry; divide by its sum, so that a target's "
                "incoming weights sum to 1 (normalize_matrix)",
                lambda: _influence_variant(A, w, n_layers, norm="row_max"),
            ),
            (
                "you took absolute values after normalising: B = |A| / row sums of |A| (normalize_matrix); "
                "signed row sums can cancel",
                lambda: _influence_variant(A, w, n_layers, norm="abs_after"),
            ),
            (
                "you did not normalise: use B = |A| with each row divided by its sum (normalize_matrix(A))",
                lambda: _influence_variant(A, w, n_layers, norm="none"),
            ),
            (
                "take absolute values before normalising: B = |A| / row sums of |A| (normalize_matrix)",
                lambda: _influence_variant(A, w, n_layers, norm="signed"),
            ),
            (
                "you normalised columns: normalise each row (a target's incoming weights sum to 1), i.e. "
                "normalize_matrix",
                lambda: _influence_variant(A, w, n_layers, norm="cols"),
            ),
        ],
        tol,
    )
    raise _Fail(
        hint
        or f"The influence{label} differs from w B + w B^2 + ... (B the row-normalised |A|), "
        f"{_worst(got, expected, 'influence')}."
    )


@_public_test("compute_influence")
def test_compute_influence(fn: Callable, w: _World) -> None:
    """Influence by the Neumann series on the row-normalised |A|, on the toy graph and hand-made ones."""
    # float32 whatever the model's dtype: the exercise is about the series, not about bfloat16 round-off.
    _influence_case(fn, w.adjacency.float(), w.logit_weights.float(), w.n_layers, 1e-5, f" ({w.name})")
    tol = 1e-5
    for label, (A, weights, n_layers) in [
        (" (a 3-node chain)", _chain()),
        (" (a graph with an all-zero row)", _zero_row_graph()),
        (" (two logit nodes)", _two_logit_graph()),
    ]:
        _influence_case(fn, A, weights, n_layers, tol, label)
