"""Quantization error proxy: expected relative MSE of each format on Gaussian weights.

memplan has no real weights, so the planner ranks quantization formats with an analytic proxy,
as LQ-LoRA (Guo et al. 2023, Sec. 3) ranks per-matrix configurations by reconstruction error
in an ILP under a bit budget: E[(w − Q(w))²]/σ² for i.i.d. w ~ N(0, σ²) rounded to the nearest
level of each library's own codebook, block by block, with the block's scale taken from its
elements (absmax, or min and max). The report shows it as SQNR = −10·log10(relative MSE) dB.

A codebook is normalized levels in [−1, 1] plus a block size and a scaling kind:
- symmetric (absmax): level ℓ stands for ℓ·M where M is the block's largest |w|, in the frame
  where that element is positive (ggml's ``d = max / −nmax`` formats are not sign-symmetric:
  Q4_0 has levels k/8, k = −7..8). Every such codebook holds +1, so the absmax element is exact.
- asymmetric (min-max): level ℓ stands for (lo + hi)/2 + ℓ·(hi − lo)/2 where lo, hi are the
  block's min and max; both extremes are exact.

Assumptions of the whole proxy: weights are i.i.d. Gaussian (real LLM weights have heavier
tails, which hurts absmax formats more); round to nearest, so GPTQ/AWQ error compensation,
AWQ scaling, llama.cpp's scale search (``make_qx_quants`` rmse_type 1, ``make_qkx2_quants``)
and imatrix lower the real error: the proxy ranks formats, it does not predict perplexity;
the scales are exact (double quantization of bitsandbytes absmax, 6-/8-bit K-quant sub-block
scales and fp16 ``d`` are ignored); GPTQ/AWQ's rounded zero point and the K-quants' clamp
min ≤ 0 are ignored (the grid spans exactly [min, max]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

from memplan.arch.tensors import Architecture, Tensor
from memplan.dtypes import Dtype
from memplan.memory import quant as q

NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
"""bitsandbytes ``functional.get_4bit_type("nf4")``; QLoRA (Dettmers et al. 2023) Sec. 3 and Appendix E."""
FP4_E2M1_CODE: tuple[float, ...] = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                    -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
"""bitsandbytes ``get_4bit_type("fp4")`` before ``data /= data.abs().max()`` (divides by 12)."""
FP4_CODE: tuple[float, ...] = tuple(v / max(map(abs, FP4_E2M1_CODE)) for v in FP4_E2M1_CODE)
INT8_BITS = 8
"""LLM.int8 ``int8_vectorwise_quant`` and ggml Q8_0: round(127·w/absmax)."""
GGML_SMALL_BLOCK = 32
"""ggml-common.h ``QK8_0 = QK4_0 = QK5_0 = QK5_1 = 32``; also the Q4_K/Q5_K sub-block (QK_K/8)."""
GGML_K_SUB_BLOCK = 16
"""ggml-common.h: Q2_K, Q3_K and Q6_K hold QK_K/16 = 16 sub-blocks of 16 elements, one scale each."""
ABSMAX_NODES = 32
"""Gauss–Legendre nodes over the block absmax (1-D quadrature of symmetric codebooks)."""
MINMAX_NODES = 16
"""Gauss–Legendre nodes per axis over (block max, block min) for min-max codebooks."""
TAIL_PROB = 1e-10
"""Probability mass left out at each end of a quadrature interval (the weights are renormalized)."""


@dataclass(frozen=True, slots=True)
class Codebook:
    """Normalized levels in [−1, 1], elements per scale, and whether the scale is min-max."""

    levels: tuple[float, ...]
    block: int
    asymmetric: bool


def symmetric_levels(bits: int) -> tuple[float, ...]:
    """Sign-symmetric b-bit integer levels k/(2^(b−1) − 1), k = −(2^(b−1) − 1)..2^(b−1) − 1."""
    qmax = 2 ** (bits - 1) - 1
    return tuple(k / qmax for k in range(-qmax, qmax + 1))


def ggml_signed_levels(bits: int) -> tuple[float, ...]:
    """ggml ``d = max / −nmax`` levels k/nmax, k = −(nmax − 1)..nmax with nmax = 2^(b−1), in the
    frame where the block's absmax element is positive (Q4_0, Q5_0, ``make_qx_quants``, ``make_q3_quants``)."""
    nmax = 2 ** (bits - 1)
    return tuple(k / nmax for k in range(-(nmax - 1), nmax + 1))


def asymmetric_levels(bits: int) -> tuple[float, ...]:
    """2^b evenly spaced levels −1 + 2k/(2^b − 1): −1 is the block min, +1 its max."""
    steps = 2**bits - 1
    return tuple(-1 + 2 * k / steps for k in range(steps + 1))


GGML_CODEBOOKS: dict[str, Codebook] = {
    "Q8_0": Codebook(symmetric_levels(INT8_BITS), GGML_SMALL_BLOCK, False),  # quantize_row_q8_0_ref
    "Q4_0": Codebook(ggml_signed_levels(4), GGML_SMALL_BLOCK, False),  # d = max / -8
    "Q5_0": Codebook(ggml_signed_levels(5), GGML_SMALL_BLOCK, False),  # d = max / -16
    "Q5_1": Codebook(asymmetric_levels(5), GGML_SMALL_BLOCK, True),  # d = (max - min) / 31, m = min
    "Q6_K": Codebook(ggml_signed_levels(6), GGML_K_SUB_BLOCK, False),  # make_qx_quants(16, 32, ...)
    "Q3_K": Codebook(ggml_signed_levels(3), GGML_K_SUB_BLOCK, False),  # make_q3_quants(16, 4, ...)
    "Q2_K": Codebook(asymmetric_levels(2), GGML_K_SUB_BLOCK, True),  # make_qkx2_quants(16, 3, ...)
    "Q4_K": Codebook(asymmetric_levels(4), GGML_SMALL_BLOCK, True),  # make_qkx2_quants(32, 15, ...)
    "Q5_K": Codebook(asymmetric_levels(5), GGML_SMALL_BLOCK, True),  # make_qkx2_quants(32, 31, ...)
}
"""ggml type -> codebook: llama.cpp ggml/src/ggml-quants.c ``quantize_row_*_ref`` and the block
structs of ggml/src/ggml-common.h (``block_q8_0`` … ``block_q6_K``). F16/F32 are not quantized."""


def storage_codebook(kind: str, *, in_features: int) -> Codebook:
    """The codebook of a quantized storage kind (a format name such as "nf4-dq" or a ggml type such as "Q6_K").

    Formula: int8 -> symmetric 8-bit, one block per row of ``in_features``; nf4/fp4 (± -dq) -> the
    16 bitsandbytes code values, block 64; gptq/awq -> asymmetric 4-bit, group min(128, in); GGUF
    file types -> their base ggml type; ggml types -> ``GGML_CODEBOOKS``.
    Source: bitsandbytes ``int8_vectorwise_quant``, ``quantize_4bit``; AutoGPTQ/AutoAWQ quantizers
    (scale = (max − min)/15 per group of 128 along in_features); llama.cpp ggml-quants.c.
    """
    if kind in GGML_CODEBOOKS:
        return GGML_CODEBOOKS[kind]
    fmt = q.FORMATS[kind]
    if fmt.library is q.Library.GGUF:
        return GGML_CODEBOOKS[fmt.gguf_base]
    if fmt.library in (q.Library.GPTQ, q.Library.AWQ):
        return Codebook(asymmetric_levels(q.INT4_BITS), min(q.GROUP_SIZE, in_features), True)
    if fmt.name == "int8":
        return Codebook(symmetric_levels(INT8_BITS), in_features, False)
    return Codebook(NF4_CODE if fmt.name.startswith("nf4") else FP4_CODE, q.BNB_4BIT_BLOCK, False)


_NORMAL = NormalDist()
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x * _SQRT_HALF)


def _pdf(x: float) -> float:
    return _INV_SQRT_2PI * math.exp(-0.5 * x * x)


def cell_error(lo: float, hi: float, c: float) -> float:
    """∫_lo^hi (x − c)² φ(x) dx for the standard normal density φ (error of one quantization cell).

    Formula: [(1 + c²)·Φ(x) − (x − 2c)·φ(x)] from lo to hi, from ∫φ = Φ, ∫xφ = −φ, ∫x²φ = Φ − xφ.
    Source: Gersho & Gray 1992, "Vector Quantization and Signal Compression", Ch. 5-6 (scalar
    quantizer distortion as a sum of cell integrals).
    """
    return ((1 + c * c) * (_cdf(hi) - _cdf(lo))) - ((hi - 2 * c) * _pdf(hi) - (lo - 2 * c) * _pdf(lo))


def _interval_error(levels: Iterable[float], lo: float, hi: float) -> float:
    """Σ_k cell_error over nearest-level cells on [lo, hi] (sorted levels inside it), sharing boundary Φ, φ."""
    pts = list(levels)
    total = 0.0
    x0, cdf0, pdf0 = lo, _cdf(lo), _pdf(lo)
    for k, c in enumerate(pts):
        x1 = hi if k == len(pts) - 1 else 0.5 * (c + pts[k + 1])
        cdf1, pdf1 = _cdf(x1), _pdf(x1)
        total += (1 + c * c) * (cdf1 - cdf0) - ((x1 - 2 * c) * pdf1 - (x0 - 2 * c) * pdf0)
        x0, cdf0, pdf0 = x1, cdf1, pdf1
    return total


@lru_cache(maxsize=8)
def _gauss_legendre(k: int) -> tuple[tuple[float, float], ...]:
    """Gauss–Legendre nodes and weights on [−1, 1] (Newton iteration on P_k)."""
    out = []
    for i in range(k):
        x = math.cos(math.pi * (i + 0.75) / (k + 0.5))
        for _ in range(100):
            p0, p1 = 1.0, x
            for j in range(2, k + 1):
                p0, p1 = p1, ((2 * j - 1) * x * p1 - (j - 1) * p0) / j
            dp = k * (x * p1 - p0) / (x * x - 1)
            step = p1 / dp
            x -= step
            if abs(step) < 1e-15:
                break
        out.append((x, 2 / ((1 - x * x) * dp * dp)))
    return tuple(out)


def _quadrature(lo: float, hi: float, log_density: Callable[[float], float], k: int) -> list[tuple[float, float]]:
    """Nodes on [lo, hi] with weights ∝ GL weight · density, normalized to sum 1."""
    half, mid = 0.5 * (hi - lo), 0.5 * (hi + lo)
    pts = [(mid + half * x, w) for x, w in _gauss_legendre(k)]
    logs = [log_density(x) for x, _ in pts]
    top = max(logs)
    raw = [(x, w * math.exp(lg - top)) for (x, w), lg in zip(pts, logs, strict=True)]
    norm = sum(w for _, w in raw)
    return [(x, w / norm) for x, w in raw]


def _upper_tail_of_root(p: float, n: int) -> float:
    """1 − p^(1/n), accurately for p near 1."""
    return -math.expm1(math.log(p) / n)


@lru_cache(maxsize=1024)
def absmax_nodes(block: int) -> tuple[tuple[float, float], ...]:
    """Quadrature (m, weight) over M = max |w_i| of ``block`` standard normals.

    Formula: P(M ≤ m) = (2Φ(m) − 1)^n, density 2n·φ(m)·(2Φ(m) − 1)^(n−1); the interval runs from
    its 1e-10 to its 1 − 1e-10 quantile, m(p) = −Φ⁻¹((1 − p^(1/n))/2), with Gauss–Legendre nodes.
    Source: order statistics of |N(0, 1)| (David & Nagaraja 2003, "Order Statistics", Sec. 2.1).
    """
    lo, hi = (-_NORMAL.inv_cdf(_upper_tail_of_root(p, block) / 2) for p in (TAIL_PROB, 1 - TAIL_PROB))

    def log_density(m: float) -> float:
        return (block - 1) * math.log1p(-math.erfc(m * _SQRT_HALF)) - 0.5 * m * m

    return tuple(_quadrature(lo, hi, log_density, ABSMAX_NODES))


@lru_cache(maxsize=64)
def minmax_nodes(block: int) -> tuple[tuple[float, float, float], ...]:
    """Quadrature (min, max, weight) over the extremes of ``block`` standard normals.

    Formula: max b: P(max ≤ b) = Φ(b)^n; given b, the other n − 1 are N(0, 1) truncated to (−∞, b]
    and their min a has P(min ≥ a | b) = (1 − Φ(a)/Φ(b))^(n−1); nested Gauss–Legendre between
    the 1e-10 and 1 − 1e-10 quantiles of each.
    Source: order statistics (David & Nagaraja 2003, Sec. 2.2, joint density of min and max).
    """
    b_lo, b_hi = (-_NORMAL.inv_cdf(_upper_tail_of_root(p, block)) for p in (TAIL_PROB, 1 - TAIL_PROB))
    outer = _quadrature(b_lo, b_hi, lambda b: (block - 1) * math.log(_cdf(b)) - 0.5 * b * b, MINMAX_NODES)
    nodes = []
    for b, wb in outer:
        cb = _cdf(b)
        a_lo, a_hi = (_NORMAL.inv_cdf(cb * _upper_tail_of_root(1 - p, block - 1)) for p in (TAIL_PROB, 1 - TAIL_PROB))

        def log_density(a: float, cb: float = cb) -> float:
            return (block - 2) * math.log1p(-_cdf(a) / cb) - 0.5 * a * a

        nodes += [(a, b, wb * wa) for a, wa in _quadrature(a_lo, a_hi, log_density, MINMAX_NODES)]
    return tuple(nodes)


@lru_cache(maxsize=4096)
def relative_mse(levels: tuple[float, ...], block: int, asymmetric: bool) -> float:
    """Expected relative MSE E[(w − Q(w))²]/σ² of block round-to-nearest quantization, w ~ N(0, σ²).

    Formula: symmetric (absmax M): (n−1)/n · E_M[ Σ_k ∫_cell_k∩[−M,M] (x − M·ℓ_k)² φ(x) dx / (2Φ(M) − 1) ];
    asymmetric (min a, max b): (n−2)/n · E_(a,b)[ Σ_k ∫_cell_k (x − g_k)² φ(x) dx / (Φ(b) − Φ(a)) ] with
    g_k = (a + b)/2 + ℓ_k·(b − a)/2; cells end at midpoints between levels; n = ``block``. Given
    the extremes, the other elements are i.i.d. normal truncated to [−M, M] (or [a, b]), and the
    extremes themselves are exact (weight 1/n, resp. 2/n). High-resolution limit: Δ²/12 with
    step Δ, i.e. SQNR ≈ 6.02·b + 4.77 − 20·log10(E[M]/σ) dB for a b-bit uniform grid.
    Source: Widrow & Kollár 2008, "Quantization Noise", Ch. 5 (Δ²/12 noise model); Gersho & Gray
    1992, Ch. 5-6 (distortion as a sum of cell integrals); Dettmers et al. 2023 (QLoRA) Sec. 3 (blockwise absmax).
    Assumptions: levels sorted into [−1, 1]; symmetric codebooks contain +1 (the absmax element
    is exact in the frame where it is positive); see the module docstring for the rest.
    """
    lv = tuple(sorted(set(levels)))
    if lv[0] < -1 or lv[-1] != 1 or (asymmetric and lv[0] != -1):
        raise ValueError(f"levels must lie in [-1, 1] and hold +1 (and -1 when asymmetric): {lv}")
    if block <= (2 if asymmetric else 1):
        return 0.0  # every element is an extreme, represented exactly
    if not asymmetric:
        acc = sum(w * _interval_error([m * v for v in lv], -m, m) / math.erf(m * _SQRT_HALF)
                  for m, w in absmax_nodes(block))
        return (block - 1) / block * acc
    acc = 0.0
    for a, b, w in minmax_nodes(block):
        mid, half = 0.5 * (a + b), 0.5 * (b - a)
        acc += w * _interval_error([mid + half * v for v in lv], a, b) / (_cdf(b) - _cdf(a))
    return (block - 2) / block * acc


def codebook_relative_mse(book: Codebook) -> float:
    """``relative_mse`` of a codebook (dimensionless, in units of σ²)."""
    return relative_mse(book.levels, book.block, book.asymmetric)


def sqnr_db(rel_mse: float) -> float:
    """Signal-to-quantization-noise ratio in dB of a relative MSE; inf when the error is 0.

    Formula: SQNR = 10·log10(σ²/MSE) = −10·log10(rel_mse).
    Source: Widrow & Kollár 2008, "Quantization Noise", Ch. 5 (signal-to-noise ratio of a quantizer).
    """
    return math.inf if rel_mse <= 0 else -10 * math.log10(rel_mse)


def _in_features(tensor: Tensor) -> int:
    """Row length along which scales run; a 1-D params-only LINEAR pseudo-tensor counts as a square matrix."""
    if len(tensor.shape) >= 2:
        return tensor.shape[-1]
    return max(1, math.isqrt(tensor.numel_each))


def tensor_relative_mse(
    fmt: str | None, tensor: Tensor, *, layer_index: int | None, num_layers: int,
    dtype: Dtype = Dtype.BF16, traits: q.MixTraits = q.DEFAULT_TRAITS,
) -> float:
    """Expected relative MSE (units of σ²) of one tensor under ``fmt``; 0 when it stays unquantized.

    Formula: relative_mse(codebook(kind)) where kind is ``quant.storage(...)``'s: the format, or
    for GGUF the per-tensor ggml type of the mix rules (F16/F32 -> 0).
    Source: ``memplan.memory.quant.storage`` (which tensors each library quantizes, and how);
    ``storage_codebook``; ``relative_mse``.
    Assumptions: tensors kept in the compute ``dtype`` (or GGUF F16/F32) are the 16-bit baseline,
    error 0; GPTQ/AWQ groups of 128 and int8 rows run along in_features (``shape[-1]``).
    """
    if fmt is None:
        return 0.0
    st = q.storage(fmt, tensor, layer_index=layer_index, num_layers=num_layers, dtype=dtype, traits=traits)
    if not st.quantized:
        return 0.0
    return codebook_relative_mse(storage_codebook(st.kind, in_features=_in_features(tensor)))


def tensors_error(
    fmt: str | None, tensors: Iterable[tuple[Tensor, int | None]], *, num_layers: int,
    dtype: Dtype = Dtype.BF16, traits: q.MixTraits = q.DEFAULT_TRAITS,
) -> float:
    """Numel-weighted squared error of ``(tensor, layer_index)`` pairs, in units of σ² (elements · σ²).

    Formula: Σ_t numel(t) · relmse(t), numel counting every copy (routed experts).
    Source: LQ-LoRA (Guo et al. 2023) Sec. 3: the ILP objective sums per-matrix reconstruction
    errors; ``tensor_relative_mse``.
    Assumptions: every tensor's weights have its own σ; dividing by Σ numel gives the mean relative MSE.
    """
    return sum(
        t.numel * tensor_relative_mse(fmt, t, layer_index=i, num_layers=num_layers, dtype=dtype, traits=traits)
        for t, i in tensors
    )


def layer_error(arch: Architecture, layer_index: int, fmt: str | None) -> float:
    """Numel-weighted squared error (elements · σ²) of decoder layer ``layer_index`` under ``fmt``.

    Formula: Σ_{t in layer} numel(t) · relmse(t), whole tensors (no tp/ep sharding), L = len(layers),
    GGUF mix rules with the architecture's ``mix_traits``.
    Source: ``tensors_error``; LQ-LoRA (Guo et al. 2023) Sec. 3.
    """
    traits = q.mix_traits(arch) if fmt is not None else q.DEFAULT_TRAITS
    pairs = ((t, layer_index) for t in arch.layers[layer_index].tensors)
    return tensors_error(fmt, pairs, num_layers=len(arch.layers), traits=traits)

