"""Tolerances that follow from floating-point arithmetic, not from one machine's rounding.

Two computations of one value (batched and unbatched, folded and layer by layer, torch and numpy) may add
their terms in different orders: BLAS kernels, SIMD widths (AVX2, AVX-512), thread splits and FMA differ
between CPUs, so the results differ in the last bits, by different amounts on each machine. A tolerance that
holds everywhere has to hold for every order. Higham's standard bounds do (N. J. Higham, Accuracy and
Stability of Numerical Algorithms, 2nd ed., 2002, section 3.1 and Lemma 3.1):

    u        = 2**-24 in float32, 2**-53 in float64 (the unit roundoff, half the machine epsilon)
    gamma_n  = n u / (1 - n u)
    |fl(x . w) - x . w|                 <= gamma_n     * sum_i |x_i w_i|           (n products, any order)
    |fl(x . w + b) - (x . w + b)|       <= gamma_{n+1} * (sum_i |x_i w_i| + |b|)

whatever the order of the additions, with or without fused multiply-adds. The functions here return such
bounds elementwise, computed from the actual operands -- the inputs of the computation under test, never its
outputs, so that a wrong result cannot widen its own tolerance. Their magnitudes and the exact references
are computed in float64, whose own errors are 2**-29 of float32's and which the bounds for float32 results
treat as exact. The bounds are first order in u (terms in u**2 are dropped). A computation within B of the
exact value and another within B' of it are within B + B' of each other.

These are worst-case bounds: typical rounding errors are far smaller (about sqrt(n) u rather than n u), so
a tolerance from them fails only on a real difference -- for a 768-term float32 dot product, one above
about 5e-5 of sum |x_i w_i|.
"""

from __future__ import annotations

import math
from typing import Any, Collection, Sequence

import numpy as np

Layers = Sequence[tuple[Any, Any]]  # [(weight (out, in), bias (out,)), ...], torch's nn.Linear layout


def as_float64(value: Any) -> np.ndarray:
    """A numpy or torch value as a float64 array (exact: every float32 is a float64)."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def unit_roundoff(dtype: Any = np.float32) -> float:
    return float(np.finfo(dtype).eps) / 2


def gamma(n: int, dtype: Any = np.float32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n successive roundings."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma_{n} is undefined in {np.dtype(dtype).name}: n u >= 1")
    return nu / (1 - nu)


def dot_error_bound(x: Any, weight: Any, bias: Any = None, dtype: Any = np.float32,
                    input_error: Any = None) -> np.ndarray:
    """Bound on |fl(x @ weight + bias) - (x @ weight + bias)| for x (..., n) and weight (n,) or (n, m),
    computed in ``dtype`` in any order: gamma_n |x| @ |weight| (gamma_{n+1} and + |bias| with a bias).

    ``input_error`` bounds, elementwise, how far the x actually used is from x (e.g. from normalising it in
    ``dtype``): it is carried through as |weight| . input_error and widens |x| in the rounding term."""
    x, weight = np.abs(as_float64(x)), np.abs(as_float64(weight))
    terms = weight.shape[0]
    carried = 0.0 if input_error is None else np.broadcast_to(as_float64(input_error), x.shape) @ weight
    magnitude = x @ weight + carried
    if bias is not None:
        magnitude = magnitude + np.abs(as_float64(bias))
        terms += 1
    return gamma(terms, dtype) * magnitude + carried


def linear_layers(source: Any) -> list[tuple[Any, Any]]:
    """The (weight, bias) pairs, in order, of a torch module's nn.Linear layers or of a head state dict
    (V1 ``weight``/``bias``, or ``layers.N.weight``/``layers.N.bias``)."""
    if hasattr(source, "modules"):
        from torch import nn

        return [(module.weight, module.bias) for module in source.modules() if isinstance(module, nn.Linear)]
    if "weight" in source:
        return [(source["weight"], source["bias"])]
    indices = sorted(int(key.split(".")[1]) for key in source if key.endswith(".weight"))
    return [(source[f"layers.{i}.weight"], source[f"layers.{i}.bias"]) for i in indices]


def evaluate_layers(layers: Layers, x: Any, relu: bool = False) -> np.ndarray:
    """The exact reference: x (N, D) through the layers in float64, ReLU between them if ``relu``."""
    y = as_float64(x)
    for index, (weight, bias) in enumerate(layers):
        y = y @ as_float64(weight).T + as_float64(bias)
        if relu and index < len(layers) - 1:
            y = np.maximum(y, 0.0)
    return y


def mlp_error_bound(layers: Layers, x: Any, relu: bool = False, dtype: Any = np.float32, input_error: Any = None,
                    rounded: Collection[int] = (), evaluated: bool = True) -> np.ndarray:
    """Bound on |computed - exact| for x (N, D) through Linear layers computed in ``dtype`` (ReLU after every
    layer but the last if ``relu``; ReLU is 1-Lipschitz, so it passes errors on unchanged). Layer by layer,
    with y a layer's exact input and e the bound on its error (``input_error`` for the first):

        e_next = |W| e + gamma_{in+1} (|W| (|y| + e) + |b|)

    the error carried in, plus the layer's own dot products on its computed input (|y_hat| <= |y| + e).
    Layers whose index is in ``rounded`` hold parameters rounded to ``dtype`` from exact ones (a rescaled or
    folded file): one more rounding, gamma_{in+2}. ``evaluated=False`` leaves the dot products out (the layers
    are not run in ``dtype``; only the parameter rounding counts). Returns (N, out) of the last layer."""
    y = as_float64(x)
    error = np.zeros_like(y) if input_error is None else np.broadcast_to(as_float64(input_error), y.shape)
    for index, (weight, bias) in enumerate(layers):
        weight, bias = as_float64(weight), as_float64(bias)
        magnitude = np.abs(weight).T
        roundings = (weight.shape[1] + 1 if evaluated else 0) + (1 if index in rounded else 0)
        error = error @ magnitude + gamma(roundings, dtype) * ((np.abs(y) + error) @ magnitude + np.abs(bias))
        y = y @ weight.T + bias
        if relu and index < len(layers) - 1:
            y = np.maximum(y, 0.0)
    return error


def _fold(layers: Layers) -> tuple[np.ndarray, float, np.ndarray, float]:
    """(w, b) with w . x + b the composition of Linear layers with nothing between (one output), composed here
    in float64, and bounds on that composition's own error. It multiplies the augmented matrices
    [[W, b], [0, 1]]; a product of matrices with inner dimensions n_1, n_2, ... is within
    gamma_{n_1 + n_2 + ...} |A_k| ... |A_1| of exact (Higham, section 3.5)."""

    def augmented(weight: Any, bias: Any) -> np.ndarray:
        weight = as_float64(weight)
        matrix = np.zeros((weight.shape[0] + 1, weight.shape[1] + 1))
        matrix[:-1, :-1], matrix[:-1, -1], matrix[-1, -1] = weight, as_float64(bias), 1.0
        return matrix

    product = augmented(*layers[0])
    magnitude = np.abs(product)
    inner = 0
    for weight, bias in layers[1:]:
        factor = augmented(weight, bias)
        product, magnitude = factor @ product, np.abs(factor) @ magnitude
        inner += factor.shape[1]
    if product.shape[0] != 2:
        raise ValueError("folding is for heads with one output")
    error = gamma(inner, np.float64) * magnitude if inner else np.zeros_like(magnitude)
    return product[0, :-1], float(product[0, -1]), error[0, :-1], float(error[0, -1])


def folded_error_bound(layers: Layers, x: Any, dtype: Any = np.float32, stored: Any = np.float32) -> np.ndarray:
    """Bound on |fl(x . w_hat + b_hat) - layers(x)| for a folded head: Linear layers with nothing between
    composed into one affine map (w, b) in float64, in any order (within the bound of :func:`_fold`), its
    parameters then stored in ``stored`` (each rounded by u of ``stored``; not again if float64), and
    evaluated in ``dtype`` (:func:`dot_error_bound`). The magnitudes are those of the exact composition,
    computed here from the layers: the bound depends on nothing the head under test computed."""
    w, b, w_error, b_error = _fold(layers)
    rounding = 0.0 if np.dtype(stored) == np.float64 else unit_roundoff(stored)
    x = as_float64(x)
    parameters = np.abs(x) @ (rounding * np.abs(w) + w_error) + rounding * abs(b) + b_error
    return dot_error_bound(x, w, b, dtype) + parameters


def normalize_error_bound(x: Any, dtype: Any = np.float32) -> np.ndarray:
    """Bound, elementwise, on |fl(x / ||x||) - x / ||x||| for rows x (..., D) normalised in ``dtype``:
    the sum of D squares is within gamma_D (relative, all terms positive), its square root halves that and
    rounds once, the division rounds once: gamma_{ceil(D/2) + 2} |x| / ||x||."""
    x = as_float64(x)
    unit = np.abs(x) / np.linalg.norm(x, axis=-1, keepdims=True)
    return gamma(math.ceil(x.shape[-1] / 2) + 2, dtype) * unit


def unit_mean(rows: Any, dtype: Any = np.float32) -> tuple[np.ndarray, float]:
    """normalize(mean_i normalize(row_i)) for rows (k, D), exactly (float64), and a bound on the Euclidean
    distance from it of the same computed in ``dtype`` (an ensemble of prompt vectors):

    - each row normalised: :func:`normalize_error_bound`;
    - their mean, summed in any order and divided by k: gamma_k sum_i |v_i| / k more (nothing for k = 1);
    - normalising m_hat = m + delta turns it by at most 2 ||delta|| / ||m||, and rounds by gamma_{ceil(D/2)+2}."""
    rows = np.atleast_2d(as_float64(rows))
    count, dim = rows.shape
    units = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    unit_errors = normalize_error_bound(rows, dtype)
    mean = units.mean(axis=0)
    delta = unit_errors.mean(axis=0) + (gamma(count, dtype) if count > 1 else 0.0) * (
        np.abs(units) + unit_errors).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm, 2 * float(np.linalg.norm(delta)) / norm + gamma(math.ceil(dim / 2) + 2, dtype)


def head_reference(head: Any, x: Any, input_error: Any = None,
                   dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """For a :class:`pipeline.models.heads.Head` scored by a HeadBank in ``dtype`` on x (N, D): the exact
    (float64) score of the head as the bank holds it (its folded weight and bias rounded to ``dtype``, or its
    MLP's layers), and the bound on the bank's distance from that score. The head's parameters are taken as
    given: this checks how the bank evaluates a head, not how the head was folded (see
    :func:`folded_error_bound` for that)."""
    x = as_float64(x)
    if head.foldable:
        weight = as_float64(head.affine_weight.numpy().astype(dtype))
        bias = float(np.asarray(head.affine_bias, dtype=dtype))
        return x @ weight + bias, dot_error_bound(x, weight, bias, dtype, input_error)
    layers = linear_layers(head.mlp)
    return (evaluate_layers(layers, x, relu=True)[:, 0],
            mlp_error_bound(layers, x, relu=True, dtype=dtype, input_error=input_error)[:, 0])


def assert_within(actual: Any, expected: Any, bound: Any, what: str = "values") -> None:
    """|actual - expected| <= bound elementwise, with the worst offender (and how much of the bound the
    largest difference uses) in the message."""
    actual, expected = as_float64(actual), as_float64(expected)
    actual, expected, bound = np.broadcast_arrays(actual, expected, as_float64(bound))
    difference = np.abs(actual - expected)
    outside = ~(difference <= bound)  # NaN is outside
    if outside.any():
        worst = np.unravel_index(np.argmax(np.where(outside, difference - bound, -np.inf)), difference.shape)
        raise AssertionError(
            f"{what}: {int(outside.sum())} of {outside.size} differ by more than their floating-point bound; "
            f"at {tuple(int(i) for i in worst)}: {actual[worst]!r} vs {expected[worst]!r}, difference "
            f"{difference[worst]:.3e} > bound {bound[worst]:.3e}")
