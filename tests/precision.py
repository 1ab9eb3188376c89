"""Tolerances derived from float32 precision, for float32 results against float64 references.

XLA on another CPU (AMD or Intel, AVX2 or AVX-512, another Eigen/oneDNN blocking, another
thread count) sums in another order, so its float32 results differ from this machine's by
rounding errors as large as their error against the exact value. A tolerance must bound
that rounding error, not the difference seen on the machine the test was written on.

The estimates here (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.;
u = EPS32 / 2 the unit roundoff):

* a sum or inner product of k float32 terms has error ``≲ √k u · Σ|terms|``: rounding
  errors behave like independent random variables (Higham & Mary, SIAM J. Sci. Comput.
  41, 2019); the worst case is ``k u``, far from what blocked or pairwise summation gives;
* a solve of an SPD system ``A w = b`` with backward error ``‖ΔA‖ ≤ c u ‖A‖`` has forward
  error ``‖ŵ − w‖ / ‖w‖ ≤ κ(A) c u`` (first order; κ = λ_max / λ_min).

The κ factor is a worst-case amplification that is rarely reached in full, so the products
below are estimates with headroom, not proofs: the errors measured against them are at
most 0.16 of the estimate (AMD EPYC Zen 4; XLA at its default ISA, limited to SSE4.2,
with single-threaded Eigen and with fast math). Where it is not obvious, a test that uses
one says which real bug (a missing example, a wrong constant) exceeds it, and by how much.
"""

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2⁻²³ ≈ 1.19e-7: float32's spacing at 1
U32 = EPS32 / 2  # unit roundoff: |fl(x) − x| ≤ U32 |x|


def relative_error(got, want) -> float:
    """``‖got − want‖_F / ‖want‖_F`` in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def assert_relative_error(got, want, bound: float, what: str = "result") -> None:
    """Asserts ``relative_error(got, want) <= bound``, with error / bound in the message."""
    err = relative_error(got, want)
    assert err <= bound, (f"{what}: relative error {err:.3g} exceeds the bound {bound:.3g} "
                          f"(error / bound = {err / bound:.2f})")


def spd_condition_number(a) -> float:
    """``κ₂(A) = λ_max / λ_min`` of a symmetric positive-definite matrix, in float64."""
    eig = np.linalg.eigvalsh(np.asarray(a, np.float64))
    return float(eig[-1] / eig[0])


def ridge_system(x, targets, gamma: float):
    """``(A, W)``: ``A = XᵀX + γI`` and ``W = A⁻¹ XᵀY`` in float64 (``x`` is cast exactly)."""
    x = np.asarray(x, np.float64)
    a = x.T @ x + gamma * np.eye(x.shape[1])
    return a, np.linalg.solve(a, x.T @ np.asarray(targets, np.float64))


def ridge_rtol(x, gamma: float, *, updates: int = 1, u: float = U32) -> float:
    """Relative (Frobenius) error estimate of ridge regression on ``x`` (n, d), float32.

    ``updates · κ(A) · √(n + d) · u``, ``A = XᵀX + γI``: forming ``XᵀX`` sums n terms per
    entry, the factorisation or a recursive (Woodbury) update adds inner products of length
    ≤ d, and both are amplified by ``κ(A)``; a recursion of ``updates`` rank updates (RLS
    learn/unlearn calls) accumulates one such error per update. ``u``: the unit roundoff
    (float64: 2⁻⁵³; a float64 reference then has an error of the same size: count it as one
    more update).
    """
    n, d = np.shape(x)
    a, _ = ridge_system(x, np.zeros((n, 1)), gamma)
    return updates * spd_condition_number(a) * np.sqrt(n + d) * u


def assert_within(got, want, bound, what: str = "result") -> None:
    """Asserts ``|got − want| <= bound`` elementwise (float64), with the worst error / bound."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    bound = np.broadcast_to(np.asarray(bound, np.float64), err.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / bound)
    assert (err <= bound).all(), f"{what}: error / bound = {ratio.max():.2f} (elementwise)"
