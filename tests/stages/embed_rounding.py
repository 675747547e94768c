"""A first-order bound on how far the embed stage's scores may lie from the exact ones, for the tiny CLIP.

tests/tolerances.py bounds the stage's own arithmetic around the model (normalisation, heads); this carries the
same kind of bound through the image tower itself, so that scores computed on different devices and in
different precisions can be compared with a tolerance that follows from the arithmetic.

The exact scores are those of the fp32 model (its parameters as stored, taken as exact) computed in float64
from the exact model input ``(x / 255 - mean) / std``. Every step the device performs is written out here,
in float64, and the result of each step gets a perturbation ``eps_k`` of zero value beside an elementwise
bound ``m_k`` on that step's own rounding error: what the step does to exact operands, computed from those
operands (never from the device's output). To first order in the unit roundoff (terms in u**2 dropped, as in
tests/tolerances.py) a computed score is then

    score + sum_k g_k . delta_k,    |delta_k| <= m_k,    g_k = d score / d eps_k

whatever the order of additions inside a kernel, so ``sum_k |g_k| . m_k`` bounds its distance from the exact
score. The g_k come from autograd on this float64 forward; the images of a batch never mix, so one backward
pass per head gives every image's gradients.

The bounds of the steps (u: unit roundoff; gamma_n as in tests/tolerances.py):

* matrix products (the patch convolution, Linear layers, attention's two products, the projection) over n
  terms: gamma_{n+1} (|x| |W| + |b|) in the accumulation's precision, plus 2 u_op |x| |W| when the kernel
  rounds its operands first (TF32 tensor cores), plus u_stored |result| for storing the result;
* additions and products of two values: one rounding in the accumulation's precision and one storing;
* layer norm: its mean (gamma_{n+1}), the centred values, its variance (gamma_{n+2}, times the condition
  number sqrt(1 + mean**2 / variance), which covers one-pass (Welford) and two-pass algorithms alike),
  1 / sqrt(variance + eps) (4 ulps), the normalised values, the affine map, the storing;
* softmax: each exponential within 2 ulps of the exponential of its rounded argument (the argument's own
  error, up to u (|s| + max s), counted twice for a rescaling by log2 e), the sum, the division, the storing;
* QuickGELU ``x * sigmoid(1.702 x)``: the constant and the product, the sigmoid (6 ulps), the last product;
* the parameters: rounded to the model's precision (bf16 models) by u_parameters relative;
* the model input: within gamma_4 of ``(x / 255 - mean) / std`` in float32 (tests/stages/test_embed.py
  checks that), then cast to the model's input type;
* the stage's L2 normalisation of the float32 features: :func:`tests.tolerances.normalize_error_bound`;
* the heads, in float32 on the bank's device, as matrix products (the folded heads' float32 weights as the
  bank holds them).

These are worst-case bounds, far above typical rounding (about sqrt(n) u per sum rather than n u): a
difference outside one is a real one (a wrong cast, a wrong normalisation, another model).

What the arithmetic of a device is (:class:`Arithmetic`) is an assumption about its kernels, stated there:
CPU kernels accumulate in float32 (bf16 ones too) and round no operands; CUDA convolutions may use TF32
when ``torch.backends.cudnn.allow_tf32`` is set (torch's default), matmuls when
``torch.backends.cuda.matmul.allow_tf32`` is, fused attention kernels may at any time; bf16 sums are
assumed to be accumulated in float32 (cuBLAS may reduce split sums in bf16 when
``allow_bf16_reduced_precision_reduction`` is set; it has no reason to split sums of 64 or 256 terms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tests.tolerances import as_float64, dot_error_bound, gamma, linear_layers, normalize_error_bound, unit_roundoff

FP32 = 2.0 ** -24
BF16 = 2.0 ** -8
TF32 = 2.0 ** -10  # 10 fraction bits; a kernel may truncate to them (one ulp) rather than round


@dataclass(frozen=True)
class Arithmetic:
    """Unit roundoffs of a device's computation of the image tower (0: that step rounds nothing)."""

    stored: float  # activations as stored between kernels: FP32 or BF16
    parameters: float = 0.0  # the model's parameters as rounded from the fp32 ones (BF16 for a bf16 model)
    conv_operands: float = 0.0  # the patch convolution's operands, rounded by the kernel (TF32)
    linear_operands: float = 0.0  # Linear layers' and the heads' operands (TF32)
    attention_operands: float = 0.0  # attention's products' operands (TF32)
    accumulated: float = FP32  # sums inside a kernel, and elementwise arithmetic (float32 for bf16 too)
    stage: Any = np.float32  # the stage's normalisation and heads (float32 in every precision)

    @classmethod
    def of(cls, device: str | torch.device, precision: str) -> "Arithmetic":
        """The arithmetic of the embed stage on ``device`` in ``precision`` (fp32, bf16 or amp_bf16), by torch's
        flags."""
        if precision == "amp_bf16":
            # Autocast keeps fp32 parameters and rounds every product's operands to bf16, storing its result in
            # bf16; the steps it leaves in fp32 (layer norms, softmax) round less than this assumes.
            return cls(stored=BF16, conv_operands=BF16, linear_operands=BF16, attention_operands=BF16)
        stored = {"fp32": FP32, "bf16": BF16}[precision]
        parameters = 0.0 if precision == "fp32" else stored
        if torch.device(device).type != "cuda":
            return cls(stored=stored, parameters=parameters)
        tf32 = precision == "fp32"
        return cls(
            stored=stored, parameters=parameters,
            conv_operands=TF32 if tf32 and torch.backends.cudnn.allow_tf32 else 0.0,
            linear_operands=TF32 if tf32 and torch.backends.cuda.matmul.allow_tf32 else 0.0,
            attention_operands=TF32 if tf32 else 0.0,
        )

    def gamma(self, n: int) -> float:
        return n * self.accumulated / (1 - n * self.accumulated)

    def of_heads(self) -> "Arithmetic":
        u = unit_roundoff(self.stage)
        return Arithmetic(stored=u, accumulated=u, linear_operands=self.linear_operands, stage=self.stage)


class Trace:
    """The float64 forward: each step's result gets a zero perturbation and a bound on its rounding."""

    def __init__(self, arithmetic: Arithmetic, sites: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.a = arithmetic
        self.sites = [] if sites is None else sites

    def rounded(self, value: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        if not bool((bound > 0).any()):
            return value
        eps = torch.zeros_like(value, requires_grad=True)
        self.sites.append((eps, bound.detach().expand_as(value)))
        return value + eps

    def parameter(self, tensor: torch.Tensor) -> torch.Tensor:
        value = tensor.detach().to("cpu", torch.float64)
        return self.rounded(value, self.a.parameters * value.abs())

    def stored(self, value: torch.Tensor, own: torch.Tensor | float = 0.0) -> torch.Tensor:
        """A result whose computation rounds by ``own`` and which is then stored."""
        return self.rounded(value, own + self.a.stored * value.detach().abs())

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = x + y
        return self.stored(out, self.a.accumulated * out.detach().abs())

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, operands: float) -> torch.Tensor:
        """x (..., n) @ weight (out, n).T + bias."""
        out = F.linear(x, weight, bias)
        products = F.linear(x.detach().abs(), weight.detach().abs())
        magnitude = products if bias is None else products + bias.detach().abs()
        # The product may be stored before the bias is added (then stored again).
        own = self.a.gamma(weight.shape[1] + 1) * magnitude + 2 * operands * products + self.a.stored * magnitude
        return self.stored(out, own)

    def layer_norm(self, x: torch.Tensor, module: torch.nn.LayerNorm) -> torch.Tensor:
        n = x.shape[-1]
        weight, bias = self.parameter(module.weight), self.parameter(module.bias)
        u = self.a.accumulated
        mean = x.mean(-1, keepdim=True)
        mean = self.rounded(mean, self.a.gamma(n + 1) * x.detach().abs().mean(-1, keepdim=True))
        centred = x - mean
        centred = self.rounded(centred, u * centred.detach().abs())
        variance = (centred * centred).mean(-1, keepdim=True)
        exact_variance = variance.detach()
        condition = torch.sqrt(1 + mean.detach() ** 2 / exact_variance)
        variance = self.rounded(variance, self.a.gamma(n + 2) * condition * exact_variance)
        scale = torch.rsqrt(variance + module.eps)
        scale = self.rounded(scale, 9 * u * scale.detach())  # the addition, the halving, 4 ulps
        normalised = centred * scale
        normalised = self.rounded(normalised, u * normalised.detach().abs())
        out = normalised * weight + bias
        own = self.a.gamma(2) * ((normalised * weight).detach().abs() + bias.detach().abs())
        return self.stored(out, own)

    def attention(self, x: torch.Tensor, module: torch.nn.MultiheadAttention) -> torch.Tensor:
        batch, length, width = x.shape
        heads, u = module.num_heads, self.a.accumulated
        head_width = width // heads
        qkv = self.linear(x, self.parameter(module.in_proj_weight), self.parameter(module.in_proj_bias),
                          self.a.linear_operands)
        q, k, v = (part.reshape(batch, length, heads, head_width).transpose(1, 2) for part in qkv.split(width, -1))
        # q . k / sqrt(d): the scale (not a power of two) rounds and so does its product, before or after the
        # sum; q and k may each be scaled (by d**-1/4) and stored first.
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_width)
        products = (q.detach().abs() @ k.detach().abs().transpose(-1, -2)) / math.sqrt(head_width)
        scores = self.stored(scores, (self.a.gamma(head_width + 3) + 2 * self.a.attention_operands
                                      + 2 * self.a.stored) * products)
        p = torch.softmax(scores, -1)
        s = scores.detach()
        exponent = 2 * u * (s.abs() + s.amax(-1, keepdim=True).abs()) + 4 * 2 * u  # argument error, 2 ulps
        pd = p.detach()
        own = pd * (exponent + (pd * exponent).sum(-1, keepdim=True) + self.a.gamma(length + 1))
        p = self.stored(p, own)
        out = p @ v
        products = p.detach() @ v.detach().abs()
        out = self.stored(out, self.a.gamma(length) * products + 2 * self.a.attention_operands * products)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.linear(out, self.parameter(module.out_proj.weight), self.parameter(module.out_proj.bias),
                           self.a.linear_operands)

    def quick_gelu(self, x: torch.Tensor) -> torch.Tensor:
        u = self.a.accumulated
        t = 1.702 * x
        t = self.stored(t, 2 * u * t.detach().abs())
        sig = torch.sigmoid(t)
        sig = self.stored(sig, 6 * 2 * u * sig.detach())
        out = x * sig
        return self.stored(out, u * out.detach().abs())


def _check_structure(visual: Any) -> None:
    """The image tower is the plain ViT this trace writes out (open_clip's, as the tiny model configures it)."""
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer

    assert type(visual) is VisionTransformer and visual.attn_pool is None and not visual.final_ln_after_pool
    assert visual.pool_type == "tok" and isinstance(visual.patch_dropout, torch.nn.Identity)
    assert visual.conv1.bias is None and visual.transformer.batch_first
    for block in visual.transformer.resblocks:
        assert type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
        assert isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)
        assert isinstance(block.mlp.gelu, QuickGELU) and block.attn.batch_first
        assert block.attn.in_proj_weight is not None and block.attn.bias_k is None


def image_features(visual: Any, pixels: np.ndarray, mean: Sequence[float], std: Sequence[float],
                   trace: Trace) -> torch.Tensor:
    """The tower on uint8 (N, S, S, 3) pixels, in float64, with every step's rounding recorded in ``trace``."""
    _check_structure(visual)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).double()
    mean_, std_ = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (mean, std))
    model_input = (x / 255 - mean_) / std_
    input_bound = gamma(4, trace.a.stage) * (x / 255 + mean_.abs()) / std_ + trace.a.stored * model_input.abs()
    x = trace.rounded(model_input, input_bound)

    weight = trace.parameter(visual.conv1.weight)  # (width, 3, P, P), stride P: a matrix product over patches
    patch = visual.conv1.stride[0]
    out = F.conv2d(x, weight, stride=patch)
    products = F.conv2d(x.detach().abs(), weight.detach().abs(), stride=patch)
    terms = weight[0].numel()
    x = trace.stored(out, trace.a.gamma(terms + 1) * products + 2 * trace.a.conv_operands * products)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    # The class and position embeddings are cast to the activations' type where they are used.
    cls = trace.stored(trace.parameter(visual.class_embedding))
    x = torch.cat([cls.view(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
    x = trace.add(x, trace.stored(trace.parameter(visual.positional_embedding)))
    x = trace.layer_norm(x, visual.ln_pre)
    for block in visual.transformer.resblocks:
        x = trace.add(x, trace.attention(trace.layer_norm(x, block.ln_1), block.attn))
        h = trace.layer_norm(x, block.ln_2)
        h = trace.linear(h, trace.parameter(block.mlp.c_fc.weight), trace.parameter(block.mlp.c_fc.bias),
                         trace.a.linear_operands)
        h = trace.quick_gelu(h)
        h = trace.linear(h, trace.parameter(block.mlp.c_proj.weight), trace.parameter(block.mlp.c_proj.bias),
                         trace.a.linear_operands)
        x = trace.add(x, h)
    pooled = trace.layer_norm(x[:, 0], visual.ln_post)
    return trace.linear(pooled, trace.parameter(visual.proj).T, None, trace.a.linear_operands)


def head_score(trace: Trace, head: Any, unit: torch.Tensor) -> torch.Tensor:
    """A head's score of unit embeddings (N, D) as a float32 HeadBank holds the head, evaluated in the
    trace's arithmetic (the stage's: float32)."""
    if head.foldable:
        weight = torch.from_numpy(head.affine_weight.numpy().astype(np.float32)).double().view(1, -1)
        bias = torch.tensor([float(np.float32(head.affine_bias))], dtype=torch.float64)
        return trace.linear(unit, weight, bias, trace.a.linear_operands)[:, 0]
    layers = linear_layers(head.mlp)
    h = unit
    for index, (weight, bias) in enumerate(layers):
        h = trace.linear(h, _float64(weight), _float64(bias), trace.a.linear_operands)
        if index < len(layers) - 1:
            h = torch.relu(h)
    return h[:, 0]


def _float64(value: Any) -> torch.Tensor:
    return torch.from_numpy(as_float64(value))


def score_bounds(clip: Any, heads: Sequence[Any], pixels: np.ndarray,
                 arithmetic: Arithmetic) -> tuple[np.ndarray, np.ndarray]:
    """(exact scores (N, H), bounds (N, H)) for the fp32 ``clip`` (a LoadedClip) and the heads of a HeadBank,
    on uint8 (N, S, S, 3) pixels, as a device of ``arithmetic`` computes them in the embed stage. One image
    at a time: a parameter's rounding is shared by every image, so its gradient is taken per image."""
    exact, bounds = [], []
    for image in pixels:
        with torch.enable_grad():
            trace, unit = _traced_unit(clip, image, arithmetic)
            head_trace = Trace(arithmetic.of_heads(), trace.sites)
            scores = torch.cat([head_score(head_trace, head, unit) for head in heads])
            row = [_first_order_bound(score, trace) for score in scores]
        exact.append(scores.detach().numpy())
        bounds.append(row)
    return np.array(exact), np.array(bounds)


def _first_order_bound(value: torch.Tensor, trace: Trace) -> float:
    """sum_k |d value / d eps_k| . m_k over the trace's rounding sites."""
    leaves = [eps for eps, _ in trace.sites]
    grads = torch.autograd.grad(value, leaves, retain_graph=True, allow_unused=True)
    return sum(float((grad.abs() * bound).sum()) for grad, (_, bound) in zip(grads, trace.sites) if grad is not None)


def _traced_unit(clip: Any, image: np.ndarray, arithmetic: Arithmetic) -> tuple[Trace, torch.Tensor]:
    """The stage's unit embedding (1, D) of one uint8 (S, S, 3) image, traced."""
    trace = Trace(arithmetic)
    features = image_features(clip.model.visual, image[None], clip.mean, clip.std, trace)
    # The stage normalises the float32 features in float32, whatever the model's precision.
    unit = F.normalize(features, dim=-1)
    normalised = normalize_error_bound(features.detach().numpy(), arithmetic.stage)
    return trace, trace.rounded(unit, torch.from_numpy(normalised))


def unit_bounds(clip: Any, pixels: np.ndarray, arithmetic: Arithmetic,
                directions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(exact u . w_k (N, K), bounds (N, K)): for the stage's unit embedding u_hat of each image (the fp32
    ``clip`` on uint8 (N, S, S, 3) pixels, computed as a device of ``arithmetic`` does, normalisation
    included), a first-order bound on |(u_hat - u) . w_k| for each direction w_k, rows of ``directions``
    (K, D), taken as exact. Without ``directions``, the unit vectors of the axes: a bound on each component
    of u_hat (D backward passes an image). The same trace as :func:`score_bounds`, with the gradients of
    u . w_k in place of the head scores'; the rounding of a product of u_hat with w_k is not included
    (:func:`tests.tolerances.dot_error_bound` bounds it)."""
    exact, bounds = [], []
    for image in pixels:
        with torch.enable_grad():
            trace, unit = _traced_unit(clip, image, arithmetic)
            weights = (torch.eye(unit.shape[1], dtype=torch.float64) if directions is None
                       else torch.from_numpy(as_float64(directions)))
            projections = (unit @ weights.T)[0]
            row = [_first_order_bound(projection, trace) for projection in projections]
        exact.append(projections.detach().numpy())
        bounds.append(row)
    return np.array(exact), np.array(bounds)


def prompt_score_bounds(clip: Any, prompt_bank: Any, pixels: np.ndarray,
                        arithmetic: Arithmetic) -> tuple[np.ndarray, np.ndarray]:
    """(centres (N, S), half-widths (N, S)) for the prompt-set columns of a
    :class:`pipeline.models.prompts.PromptBank` (sets in its order), scored by the stage on the fp32 ``clip``'s
    unit embeddings of uint8 (N, S, S, 3) pixels as a device of ``arithmetic`` computes them: every such
    computation of a column lies within its half-width of its centre.

    The bank computes the similarities ``u_hat @ M`` with its float32 (D, P) matrix M of text vectors (the
    same for every run: taken as exact), then sums and differences of them. A similarity u_hat . m_j is
    within (u_hat - u) . m_j of u . m_j, plus its own rounding r_j (dot_error_bound: gamma_D |u| . |m_j|, and
    2 u_op |u| . |m_j| for a kernel that rounds its operands). A signed sum of such similarities is within

        B = bound on (u_hat - u) . w    (unit_bounds along w, the signed sum of the m_j: errors along
                                         nearly parallel prompt vectors cancel, and w keeps that)
            + sum of their r_j + u_stage |u . w| for each addition or subtraction

    of the exact u . w. An ensemble set is a difference (a set without negatives subtracts the zero column,
    r = 0): its centre is the exact score, its half-width B. A ``best_class`` set scores the difference of the
    class whose computed sum (positive + negative) is largest. A class c other than the exact argmax c* can be
    that only if its computed sum reaches c*'s, which needs the exact difference of their sums plus B of that
    difference (along the difference of their directions) to reach zero; the score then lies between the
    lowest (difference - B) and the highest (difference + B) of the classes that can win (with c* alone, the
    exact score +- B). A ``best_class`` set without negatives scores the computed maximum of the positive
    similarities, which lies between the largest (similarity - B) and the largest (similarity + B). The
    bank's layout (its private matrix and index tensors) is read as the bank scores with it. One image at a
    time: which class wins, and so the directions, depend on the image."""
    heads_arithmetic = arithmetic.of_heads()
    u_stage = heads_arithmetic.accumulated
    matrix = as_float64(prompt_bank._matrix)  # (D, P)
    count = len(prompt_bank.prompt_sets.sets)
    centres, halves = np.zeros((len(pixels), count)), np.zeros((len(pixels), count))
    for n, image in enumerate(pixels):
        unit = _traced_unit(clip, image, arithmetic)[1].detach().numpy()[0]
        rounding = (dot_error_bound(unit, matrix, dtype=heads_arithmetic.stage)
                    + 2 * heads_arithmetic.linear_operands * (np.abs(unit) @ np.abs(matrix)))  # (P,)
        # Signed sums of similarities: (+1/-1 for each column, additions); their directions are sum_j c_j m_j.
        terms: list[tuple[dict[int, int], int]] = []
        plan: list[tuple[str, int, Any]] = []  # (kind, output, indices into terms)

        def add(coefficients: dict[int, int]) -> int:
            coefficients = {j: c for j, c in coefficients.items() if c and matrix[:, j].any()}  # not the zero column
            terms.append((coefficients, len(coefficients) - 1))
            return len(terms) - 1

        for output, positive, negative in zip(prompt_bank._ensemble_outputs, prompt_bank._ensemble_positive,
                                              prompt_bank._ensemble_negative):
            plan.append(("exact", int(output), add({int(positive): 1, int(negative): -1})))
        for layout in prompt_bank._best_class:
            positive = [int(j) for j in layout.positive]
            if layout.negative is None:
                plan.append(("maximum", layout.output, [add({j: 1}) for j in positive]))
                continue
            negative = [int(j) for j in layout.negative]
            sums = [unit @ (matrix[:, a] + matrix[:, b]) for a, b in zip(positive, negative)]
            best = int(np.argmax(sums))
            a_best, b_best = positive[best], negative[best]
            rivals = [add({a: 1, b: 1, a_best: -1, b_best: -1}) if c != best else None
                      for c, (a, b) in enumerate(zip(positive, negative))]
            differences = [add({a: 1, b: -1}) for a, b in zip(positive, negative)]
            plan.append(("best_class", layout.output, (rivals, differences)))
        directions = np.stack([sum(c * matrix[:, j] for j, c in coefficients.items()) for coefficients, _ in terms])
        exact, propagated = (v[0] for v in unit_bounds(clip, image[None], arithmetic, directions))
        bound = propagated + np.array([sum(rounding[j] for j in coefficients) for coefficients, _ in terms])
        # Each addition or subtraction rounds its result, by at most u_stage times the sum of the terms'
        # magnitudes (a rival's comparison rounds the two sums, and counts three roundings: room to spare).
        magnitudes = np.abs(unit @ matrix)  # |u . m_j|
        bound += np.array([u_stage * (additions * sum(magnitudes[j] for j in coefficients))
                           for coefficients, additions in terms])
        for kind, output, which in plan:
            if kind == "exact":
                centre, half = exact[which], bound[which]
            elif kind == "maximum":
                low, high = (exact[which] - bound[which]).max(), (exact[which] + bound[which]).max()
                centre, half = (low + high) / 2, (high - low) / 2
            else:
                rivals, differences = which
                can_win = [c for c, k in enumerate(rivals) if k is None or exact[k] + bound[k] >= 0]
                low = min(exact[differences[c]] - bound[differences[c]] for c in can_win)
                high = max(exact[differences[c]] + bound[differences[c]] for c in can_win)
                centre, half = (low + high) / 2, (high - low) / 2
            centres[n, output], halves[n, output] = centre, half
    return centres, halves
