"""How export validation judges a graph against PyTorch: by a tolerance scaled to each output's
magnitude, and, for logits, by the decisions that depend on them.

fp32 rounding grows with the values it rounds: widely spread weights (N(0, 1) matrices) give logits in
the hundreds, where a correct graph differs from PyTorch by more than any fixed absolute bound. So an
output passes when ``max|onnx - torch| <= atol + rtol * max|torch|``. For logits, what matters is what
beam search does with them: per row, the top ``k`` tokens and their order must agree. A swap is a float
near-tie when the two tokens' reference logits are within twice the tolerance; anything else is a real
drift.

Outcome: an export fails when a decision changes beyond near-ties, or when an output exceeds its
tolerance grossly (``GROSS`` times); a smaller excess is recorded and logged. ``strict`` fails on any
excess and any changed decision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .errors import ValidationError

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
GROSS = 10.0


@dataclass(frozen=True)
class Tolerance:
    """Validation bounds.

    Attributes:
        atol: Absolute part of each output's tolerance.
        rtol: Part proportional to the output's largest reference magnitude.
        strict: Fail on any excess over the tolerance and any changed decision, near-ties included.
        enforce: False measures only (drift of reduced precision): nothing fails.
    """

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    strict: bool = False
    enforce: bool = True

    def bound(self, max_ref: float) -> float:
        return self.atol + self.rtol * max_ref


MEASURE_ONLY = Tolerance(enforce=False)


def check_values(graph: str, name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> dict:
    """Shape, then ``max_abs_diff`` against ``tolerance``; returns the figures."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        raise ValidationError(graph, name, f"has shape {got.shape}, PyTorch {ref.shape}")
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if got.size else 0.0
    max_ref = float(np.abs(ref).max()) if ref.size else 0.0
    figures = {"max_abs_diff": diff, "max_abs_ref": max_ref, "tolerance": tol.bound(max_ref)}
    if not np.isfinite(got).all() and np.isfinite(ref).all():
        raise ValidationError(graph, name, "has NaN or infinite values where PyTorch has none")
    excess = diff / figures["tolerance"] if figures["tolerance"] > 0 else (np.inf if diff > 0 else 0.0)
    if tol.enforce and (excess > GROSS or (tol.strict and excess > 1)):
        raise ValidationError(graph, name, f"differs from PyTorch by {diff:.3g}, {excess:.1f}x its tolerance "
                              f"{figures['tolerance']:.3g} (atol {tol.atol:g} + rtol {tol.rtol:g} x max|ref| "
                              f"{max_ref:.3g})")
    if tol.enforce and excess > 1:
        logger.warning("  %s %s differs from PyTorch by %.3g, %.1fx its tolerance %.3g (accepted: below %gx; "
                       "--strict refuses it)", graph, name, diff, excess, figures["tolerance"], GROSS)
    return figures


def check_decisions(graph: str, name: str, got: np.ndarray, ref: np.ndarray, k: int, tol: Tolerance,
                    tolerance: float) -> dict:
    """Per row of ``[rows, vocab]`` logits: do the top ``k`` tokens and their order agree?

    Returns ``rows``, ``rows_agreeing``, ``near_tie_rows`` (disagreeing only among tokens whose reference
    logits are within ``2 * tolerance``), ``min_top_gap`` (smallest reference top-1/top-2 gap: how close
    the closest call was) and ``worst_swap_gap`` (largest reference gap between two swapped tokens).
    """
    got = np.asarray(got, dtype=np.float64).reshape(-1, got.shape[-1])
    ref = np.asarray(ref, dtype=np.float64).reshape(-1, ref.shape[-1])
    k = min(k, ref.shape[-1])
    ref_top = np.argsort(-ref, axis=-1, kind="stable")[:, :k]
    got_top = np.argsort(-got, axis=-1, kind="stable")[:, :k]
    ref_sorted = np.take_along_axis(ref, ref_top, axis=-1)
    figures = {"rows": int(ref.shape[0]), "top_k": k, "rows_agreeing": 0, "near_tie_rows": 0,
               "min_top_gap": float((ref_sorted[:, 0] - ref_sorted[:, 1]).min()) if k > 1 else float("inf"),
               "worst_swap_gap": 0.0}
    for row in range(ref.shape[0]):
        if np.array_equal(ref_top[row], got_top[row]):
            figures["rows_agreeing"] += 1
            continue
        # The reference logit of what the graph ranked at each place against what PyTorch ranked there.
        gap = float(np.abs(ref[row, got_top[row]] - ref_sorted[row]).max())
        figures["worst_swap_gap"] = max(figures["worst_swap_gap"], gap)
        figures["near_tie_rows"] += gap <= 2 * tolerance
    changed = figures["rows"] - figures["rows_agreeing"]
    real = changed - figures["near_tie_rows"]
    if tol.enforce and real > 0:
        raise ValidationError(graph, name, f"changes beam-search decisions: the top-{k} tokens differ from "
                              f"PyTorch in {changed} of {figures['rows']} rows ({real} beyond near-ties: a swapped "
                              f"pair {figures['worst_swap_gap']:.3g} apart in PyTorch's logits, more than twice "
                              f"the tolerance {tolerance:.3g})")
    if tol.enforce and tol.strict and changed > 0:
        raise ValidationError(graph, name, f"swaps near-tied top-{k} tokens in {changed} of {figures['rows']} "
                              f"rows (at most {figures['worst_swap_gap']:.3g} apart; --strict refuses any change)")
    if tol.enforce and changed:
        logger.warning("  %s %s: %d of %d rows swap near-tied tokens (at most %.3g apart; tolerance %.3g)",
                       graph, name, changed, figures["rows"], figures["worst_swap_gap"], tolerance)
    return figures
