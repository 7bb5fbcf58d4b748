"""NumPy reference for MUVERA fixed dimensional encodings (FDE) and Chamfer similarity.

This module is the numerics contract of ``embkern.fde_encode`` / ``FDEEncoder``
(``docs/ops/fde.md``). It reproduces the reference C++ (google/graph-mining
``sketching/point_cloud``, as wrapped by the PyPI package ``muvfde`` 0.0.9)
bit for bit:

* random tables from ``mt19937`` with libstdc++'s (GCC >= 11) distribution
  algorithms, re-implemented here on the raw 32-bit stream
  (:func:`simhash_table`, :func:`ams_table`, :func:`count_sketch_table`);
* the sign bits ``x . G[:, j] > 0`` and the AMS projection in the exact
  float32 summation order in which the reference's Eigen (3.4 pre-release,
  SSE2, no FMA: the x86-64 wheel) evaluates ``X * G`` (:func:`eigen_matmul`);
* per-partition sums in input order, IEEE division, fill by the lowest-index
  nearest point, and the count sketch summed in ascending input index.

Why the summation order matters: the bits only need signs, but a dot product
within rounding of zero takes the sign of the order it is summed in. Random
float inputs hit that about once per 1e6 dot products (~1 in 200 documents of
80 points at R=20, k=5); adversarial inputs (points orthogonal to a hyperplane)
hit it ~40% of the time. Eigen sums ``X * G`` (col-major, ``N x d`` by
``d x k``) as follows, verified against ``muvfde`` on such adversarial points
for d in {3, 8, 13, 31, 64, 100, 128, 130, 256, 768, 1024} and N in 1..400:

* ``d + N + k < 20`` (lazy coefficient product), or ``k == 1`` (GEMV that
  ``muvfde`` runs through Eigen's non-BLAS loop): plain sequential sum over i.
* ``N == 1`` (row-major GEMV): 4 lanes ``i mod 4`` for ``i < 4*floor(d/4)``,
  reduced ``(l0 + l2) + (l1 + l3)``, then the tail in order.
* otherwise GEMM (gebp kernel, mr = 8, nr = 4): rows are blocked by ``mc`` and
  depth by ``kc`` (Eigen's cache heuristic, :func:`eigen_blocking`); within a
  depth block of ``kc`` terms, for a row ``r`` of an ``mc`` block of ``rows``
  rows and a column in a full 4-column panel (``j < 4*floor(k/4)``):
  rows below ``8*floor(rows/8)`` sum sequentially; the next
  ``4*floor((rows mod 8)/4)`` rows sum even / odd i (below ``kc & ~7``)
  into two accumulators ``C + D``, then the rest into C; the last
  ``rows mod 4`` rows use four accumulators ``i mod 4`` (below
  ``4*floor(kc/4)``) reduced ``(C0 + C1) + (C2 + C3)``, then the rest.
  Columns past the last full panel sum sequentially. Depth blocks add up as
  ``out = block + out``.

Eigen reads the CPU's cache sizes to choose ``mc`` and ``kc``; the constants
:data:`EIGEN_L1`, :data:`EIGEN_L2` (32 KiB, 512 KiB: the caches of the machines
the order was derived on; the order changes only for ``d > 680`` or for documents
longer than ``mc``, e.g. 336 points at d = 128) are part of this contract.
Every product is rounded before it is added (no FMA).

Edge cases the reference gets wrong, defined here (docs/ops/fde.md, "Edge cases and bad input"): an empty document
gives zeros (the reference divides by 0 for k = 0 and reads out of bounds
with fill); ``final_projection_dimension=0``, k outside 0..30, AMS without
``projection_dimension`` and a query with fill raise ``ValueError``.
NaN / inf points: a NaN dot product gives bit 0 (``NaN > 0`` is false) and the
values propagate into their partition, as in the reference; the public API
rejects non-finite points before any kernel runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

ENCODING_TYPES = ("query", "document")
PROJECTION_TYPES = ("identity", "ams_sketch")
MAX_SIMHASH = 30
# d_p and the final dimension D index int32 tables (AMS, count sketch): < 2^31.
MAX_PROJECTION = 2**31 - 1

# Cache sizes that steer Eigen's GEMM blocking (see module docstring).
EIGEN_L1 = 32 * 1024
EIGEN_L2 = 512 * 1024
EIGEN_L3 = 32 * 1024 * 1024
_MR, _NR = 8, 4  # gebp register blocking for float on SSE2 without FMA


# ---------------------------------------------------------------------------
# Config


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


@dataclass(frozen=True)
class FDEConfig:
    """MUVERA FDE configuration (names and defaults of the reference's proto).

    Args:
        dimension: d, the input point dimension (> 0).
        num_repetitions: R >= 1 independent repetitions.
        num_simhash_projections: k in 0..30 (required; 2^k partitions).
        seed: repetition r uses ``uint32(seed + r)``; the final count sketch
            uses ``uint32(seed)``. Any int in [-2^31, 2^32).
        encoding_type: "query" (SUM) or "document" (AVERAGE).
        projection_type: "identity" or "ams_sketch" (sparse +-1, no scaling).
        projection_dimension: d_p, required > 0 for "ams_sketch"; identity uses d.
        fill_empty_partitions: documents only; an empty partition takes the
            point whose bits are nearest (lowest index on ties).
        final_projection_dimension: if set (> 0), count-sketch the FDE to this length.
    """

    dimension: int
    num_repetitions: int = 1
    num_simhash_projections: Optional[int] = None
    seed: int = 1
    encoding_type: str = "query"
    projection_type: str = "identity"
    projection_dimension: Optional[int] = None
    fill_empty_partitions: bool = False
    final_projection_dimension: Optional[int] = None

    def __post_init__(self):
        d = _int(self.dimension, "dimension")
        if d <= 0:
            raise ValueError(f"dimension: expected > 0, got {d}")
        r = _int(self.num_repetitions, "num_repetitions")
        if r < 1:
            raise ValueError(f"num_repetitions: expected >= 1, got {r}")
        if self.num_simhash_projections is None:
            raise ValueError("num_simhash_projections: required (0 <= k <= 30), got None")
        k = _int(self.num_simhash_projections, "num_simhash_projections")
        if not 0 <= k <= MAX_SIMHASH:
            raise ValueError(f"num_simhash_projections: expected 0 <= k <= {MAX_SIMHASH}, got {k}")
        s = _int(self.seed, "seed")
        if not -(2**31) <= s < 2**32:
            raise ValueError(f"seed: expected an int in [-2^31, 2^32), got {s}")
        if self.encoding_type not in ENCODING_TYPES:
            raise ValueError(f"encoding_type: expected one of {ENCODING_TYPES}, got {self.encoding_type!r}")
        if self.projection_type not in PROJECTION_TYPES:
            raise ValueError(f"projection_type: expected one of {PROJECTION_TYPES}, got {self.projection_type!r}")
        if self.projection_type == "ams_sketch":
            if self.projection_dimension is None:
                raise ValueError("projection_dimension: required (> 0) for projection_type='ams_sketch', got None")
            dp = _int(self.projection_dimension, "projection_dimension")
            if not 0 < dp <= MAX_PROJECTION:
                raise ValueError(f"projection_dimension: expected 1 <= d_p <= 2^31 - 1 for "
                                 f"projection_type='ams_sketch', got {dp}")
        elif self.projection_dimension is not None:
            dp = _int(self.projection_dimension, "projection_dimension")
            if dp != d:
                raise ValueError(f"projection_dimension: the identity projection keeps d = {d}; got {dp} "
                                 "(use projection_type='ams_sketch' to reduce it)")
        if not isinstance(self.fill_empty_partitions, (bool, np.bool_)):
            raise TypeError(f"fill_empty_partitions: expected a bool, got {type(self.fill_empty_partitions).__name__}")
        if self.fill_empty_partitions and self.encoding_type == "query":
            raise ValueError("fill_empty_partitions: query encodings (SUM) do not support fill; "
                             "use encoding_type='document'")
        if self.final_projection_dimension is not None:
            D = _int(self.final_projection_dimension, "final_projection_dimension")
            if not 0 < D <= MAX_PROJECTION:
                raise ValueError(f"final_projection_dimension: expected 1 <= D <= 2^31 - 1 or None, got {D}")
        n = self.fde_dimension_before_projection
        if n > 2**40:
            raise ValueError(f"config: R * 2^k * d_p = {n} values per encoding is too large")

    # derived -------------------------------------------------------------
    @property
    def is_document(self) -> bool:
        return self.encoding_type == "document"

    @property
    def projection_dim(self) -> int:
        """d_p: the per-partition block length."""
        return int(self.projection_dimension) if self.projection_type == "ams_sketch" else int(self.dimension)

    @property
    def num_partitions(self) -> int:
        return 1 << int(self.num_simhash_projections)

    @property
    def fde_dimension_before_projection(self) -> int:
        return int(self.num_repetitions) * self.num_partitions * self.projection_dim

    @property
    def output_dimension(self) -> int:
        """Length of one encoding: final_projection_dimension if set, else R * 2^k * d_p."""
        if self.final_projection_dimension is not None:
            return int(self.final_projection_dimension)
        return self.fde_dimension_before_projection

    def replace(self, **changes) -> "FDEConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------
# mt19937 and libstdc++'s distribution algorithms

_M32 = 0xFFFFFFFF


class MT19937:
    """The standard 32-bit Mersenne Twister (std::mt19937), vectorised over the state."""

    def __init__(self, seed: int):
        mt = [0] * 624
        mt[0] = int(seed) & _M32
        for i in range(1, 624):
            mt[i] = (1812433253 * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i) & _M32
        self._mt = np.array(mt, dtype=np.uint32)
        self._i = 624

    def _twist(self) -> None:
        mt = self._mt
        # mt[i] depends on mt[i+1] (old) and mt[i+397 mod 624]: new for
        # i >= 227, so the update runs in slices whose inputs are final.
        for lo, hi in ((0, 227), (227, 454), (454, 623), (623, 624)):
            i = np.arange(lo, hi)
            y = (mt[i] & np.uint32(0x80000000)) | (mt[(i + 1) % 624] & np.uint32(0x7FFFFFFF))
            v = mt[(i + 397) % 624] ^ (y >> np.uint32(1))
            v ^= np.where((y & np.uint32(1)) != 0, np.uint32(0x9908B0DF), np.uint32(0))
            mt[lo:hi] = v
        self._i = 0

    def raw(self, n: int) -> np.ndarray:
        """The next n outputs, uint32."""
        out = np.empty(n, np.uint32)
        k = 0
        while k < n:
            if self._i >= 624:
                self._twist()
            m = min(n - k, 624 - self._i)
            y = self._mt[self._i:self._i + m].copy()
            y ^= y >> np.uint32(11)
            y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
            y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
            y ^= y >> np.uint32(18)
            out[k:k + m] = y
            k += m
            self._i += m
        return out


_ONE_MINUS = np.nextafter(np.float32(1), np.float32(0))


def _libm_logf():
    # The contract (docs/ops/fde.md, "Random tables") pins glibc's logf (it is not correctly rounded: it differs from
    # float(log(double)) on ~2e5 of the 1.07e9 floats in (0, 1]).
    name = ctypes.util.find_library("m")
    try:
        lib = ctypes.CDLL(name) if name else ctypes.CDLL("libm.so.6")
        fn = lib.logf
        fn.restype = ctypes.c_float
        fn.argtypes = [ctypes.c_float]
        return fn
    except OSError:  # pragma: no cover - non-glibc platforms
        return lambda x: float(np.float32(math.log(x)))


_logf = _libm_logf()


def _u01_f32(g: np.ndarray) -> np.ndarray:
    u = g.astype(np.float32) * np.float32(2.0 ** -32)
    return np.where(u >= 1, _ONE_MINUS, u)


def normals(seed: int, n: int) -> np.ndarray:
    """First n draws of std::normal_distribution<float>(0, 1) on mt19937(seed) (libstdc++ Marsaglia polar)."""
    mt = MT19937(seed)
    need = (n + 1) // 2
    parts: List[np.ndarray] = []
    got = 0
    pending = np.zeros(0, np.uint32)
    while got < need:
        g = np.concatenate([pending, mt.raw(2 * int((need - got) * 1.3 + 16))])
        u = _u01_f32(g)
        v = ((2 * u).astype(np.float64) - 1.0).astype(np.float32)
        x, y = v[0::2], v[1::2]
        r2 = x * x + y * y  # float32, two roundings (no FMA)
        ok = np.nonzero((r2 <= 1) & (r2 != 0))[0]
        take = min(need - got, len(ok))
        sel = ok[:take]
        # draws after the last used pair stay in the stream for the next round
        used = 2 * (int(sel[-1]) + 1) if take else len(g)
        pending = g[used:] if take == need - got else np.zeros(0, np.uint32)
        xs, ys, rs = x[sel], y[sel], r2[sel]
        logs = np.array([_logf(float(t)) for t in rs], dtype=np.float32)
        mult = np.sqrt(np.float32(-2) * logs / rs)
        parts.append(np.stack([ys * mult, xs * mult], 1).reshape(-1))
        got += take
    return np.concatenate(parts)[:n] if parts else np.zeros(0, np.float32)


def _bounded(mt: MT19937, m: int, first: int) -> Tuple[int, int]:
    """Lemire's nearly divisionless UniformInt(0, m-1) from a first draw; returns (value, extra draws)."""
    prod = first * m
    low = prod & _M32
    extra = 0
    if low < m:
        thr = ((1 << 32) - m) % m
        while low < thr:
            prod = int(mt.raw(1)[0]) * m
            low = prod & _M32
            extra += 1
    return prod >> 32, extra


def _index_sign_pairs(seed: int, count: int, m: int) -> Tuple[np.ndarray, np.ndarray]:
    """count x (UniformInt(0, m-1), sign) drawn in that order from one mt19937(seed) stream."""
    mt = MT19937(seed)
    idx = np.empty(count, np.int64)
    sgn = np.empty(count, np.float32)
    thr = ((1 << 32) - m) % m
    buf = np.zeros(0, np.uint64)  # drawn but not yet consumed
    done = 0
    while done < count:
        todo = count - done
        if len(buf) < 3 * todo:
            buf = np.concatenate([buf, mt.raw(3 * todo - len(buf) + 3).astype(np.uint64)])
        g = buf[:3 * todo]
        prod = g[0::3] * np.uint64(m)
        low = prod & np.uint64(_M32)
        bad = np.nonzero(low < np.uint64(thr))[0]
        ok = int(bad[0]) if len(bad) else todo
        idx[done:done + ok] = (prod[:ok] >> np.uint64(32)).astype(np.int64)
        sgn[done:done + ok] = _bernoulli_sign(g[1::3][:ok], g[2::3][:ok])
        done += ok
        buf = buf[3 * ok:]
        if done == count:
            break
        # entry `done` hit Lemire's rejection: redraw until accepted, then its sign
        pos = 0
        prod_i = int(buf[pos]) * m
        while (prod_i & _M32) < thr:
            pos += 1
            if pos >= len(buf):
                buf = np.concatenate([buf, mt.raw(64).astype(np.uint64)])
            prod_i = int(buf[pos]) * m
        if pos + 3 > len(buf):
            buf = np.concatenate([buf, mt.raw(64).astype(np.uint64)])
        idx[done] = prod_i >> 32
        sgn[done] = _bernoulli_sign(buf[pos + 1:pos + 2], buf[pos + 2:pos + 3])[0]
        buf = buf[pos + 3:]
        done += 1
    return idx, sgn


def _bernoulli_sign(g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    # generate_canonical<double, 53>: low word first, sum rounded to double
    s = g1.astype(np.float64) + g2.astype(np.float64) * 4294967296.0
    u = s / 18446744073709551616.0
    u = np.where(u >= 1.0, np.nextafter(1.0, 0.0), u)
    return np.where(u < 0.5, np.float32(1), np.float32(-1))


def _rep_seed(seed: int, r: int) -> int:
    return (int(seed) + int(r)) & _M32


def simhash_table(seed: int, dimension: int, num_simhash: int, num_repetitions: int) -> np.ndarray:
    """G: float32 (R, d, k), G[r, i, j] = normal draw number j*d + i of mt19937(uint32(seed + r))."""
    d, k, R = int(dimension), int(num_simhash), int(num_repetitions)
    out = np.zeros((R, d, k), np.float32)
    if k == 0 or d == 0:
        return out
    for r in range(R):
        out[r] = normals(_rep_seed(seed, r), d * k).reshape(k, d).T
    return out


def ams_table(seed: int, dimension: int, projection_dim: int, num_repetitions: int) -> Tuple[np.ndarray, np.ndarray]:
    """AMS sketch: (index int32 (R, d) in [0, d_p), sign float32 (R, d) in {+1, -1})."""
    d, dp, R = int(dimension), int(projection_dim), int(num_repetitions)
    idx = np.zeros((R, d), np.int32)
    sgn = np.zeros((R, d), np.float32)
    for r in range(R):
        i, s = _index_sign_pairs(_rep_seed(seed, r), d, dp)
        idx[r] = i
        sgn[r] = s
    return idx, sgn


def count_sketch_table(seed: int, length: int, final_dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """Count sketch of an FDE of `length` values to `final_dim`: (bucket int32 (length,), sign float32 (length,))."""
    i, s = _index_sign_pairs(int(seed) & _M32, int(length), int(final_dim))
    return i.astype(np.int32), s


def count_sketch_csr(bucket: np.ndarray, sign: np.ndarray, final_dim: int):
    """bucket -> input-index CSR: (offsets int64 (D+1,), members int64 (L,) ascending per bucket, signs float32 (L,))."""
    order = np.argsort(bucket, kind="stable")
    counts = np.bincount(bucket, minlength=int(final_dim))
    offsets = np.zeros(int(final_dim) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, order.astype(np.int64), sign[order].astype(np.float32)


# ---------------------------------------------------------------------------
# Eigen's float32 summation order for X * W


def eigen_blocking(m: int, k: int, n: int) -> Tuple[int, int, int]:
    """(kc, mc, nc) of Eigen's evaluateProductBlockingSizesHeuristic (1 thread) for an m x k by k x n product."""
    if max(k, m, n) < 48:
        return k, m, n
    k_sub = _MR * _NR * 4
    k_div = _MR * 4 + _NR * 4
    max_kc = max(((EIGEN_L1 - k_sub) // k_div) & ~7, 1)
    old_k = k
    if k > max_kc:
        k = max_kc if k % max_kc == 0 else max_kc - 8 * ((max_kc - 1 - (k % max_kc)) // (8 * (k // max_kc + 1)))
    actual_l2 = 1572864
    remaining_l1 = EIGEN_L1 - k_sub - m * k * 4
    if remaining_l1 >= _NR * 4 * k:
        max_nc = remaining_l1 // (k * 4)
    else:
        max_nc = (3 * actual_l2) // (2 * 2 * max_kc * 4)
    nc = min(actual_l2 // (2 * k * 4), max_nc) & ~(_NR - 1)
    if n > nc:
        n = nc if n % nc == 0 else nc - _NR * ((nc - (n % nc)) // (_NR * (n // nc + 1)))
    elif old_k == k:
        problem_size = k * n * 4
        actual_lm, max_mc = actual_l2, m
        if problem_size <= 1024:
            actual_lm = EIGEN_L1
        elif EIGEN_L3 != 0 and problem_size <= 32768:
            actual_lm = EIGEN_L2
            max_mc = min(576, max_mc)
        mc = min(actual_lm // (3 * k * 4), max_mc)
        if mc > _MR:
            mc -= mc % _MR
        elif mc == 0:
            return k, m, n
        m = mc if m % mc == 0 else mc - _MR * ((mc - (m % mc)) // (_MR * (m // mc + 1)))
    return k, m, n


def _seq(t: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over axis -2 of t (..., L, c), starting from +0."""
    acc = np.zeros(t.shape[:-2] + t.shape[-1:], np.float32)
    for i in range(t.shape[-2]):
        acc = acc + t[..., i, :]
    return acc


def eigen_matmul(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """X (n, d) @ W (d, c) in float32, summed in the order muvfde's Eigen uses (module docstring)."""
    X = np.ascontiguousarray(X, np.float32)
    W = np.ascontiguousarray(W, np.float32)
    n, d = X.shape
    c = W.shape[1]
    out = np.zeros((n, c), np.float32)
    if n == 0 or c == 0 or d == 0:
        return out
    T = X[:, :, None] * W[None, :, :]  # every product rounded to float32
    if d + n + c < 20 or c == 1:
        return _seq(T)
    if n == 1:
        n4 = d // 4 * 4
        lanes = [_seq(T[:, l:n4:4, :]) for l in range(4)]
        r = (lanes[0] + lanes[2]) + (lanes[1] + lanes[3])
        for i in range(n4, d):
            r = r + T[:, i, :]
        return r
    kc, mc, _ = eigen_blocking(n, d, c)
    pc4 = (c // 4) * 4
    for i2 in range(0, n, mc):
        rows = min(i2 + mc, n) - i2
        m2 = (rows // 8) * 8
        m1 = m2 + ((rows - m2) // 4) * 4
        for k2 in range(0, d, kc):
            akc = min(k2 + kc, d) - k2
            Tb = T[i2:i2 + rows, k2:k2 + akc, :]
            blk = _seq(Tb)
            if pc4 and m1 > m2:
                t = Tb[m2:m1, :, :pc4]
                pk = akc & ~7
                C = _seq(t[:, 0:pk:2, :]) + _seq(t[:, 1:pk:2, :])
                for i in range(pk, akc):
                    C = C + t[:, i, :]
                blk[m2:m1, :pc4] = C
            if pc4 and rows > m1:
                t = Tb[m1:rows, :, :pc4]
                e4 = (akc // 4) * 4
                Cs = [_seq(t[:, l:e4:4, :]) for l in range(4)]
                C = (Cs[0] + Cs[1]) + (Cs[2] + Cs[3])
                for i in range(e4, akc):
                    C = C + t[:, i, :]
                blk[m1:rows, :pc4] = C
            out[i2:i2 + rows] = blk + out[i2:i2 + rows]
    return out


# ---------------------------------------------------------------------------
# Encoding


class Tables:
    """The random tables of one config (generated once, reused for every call)."""

    def __init__(self, config: FDEConfig):
        c = config
        self.config = c
        self.simhash = simhash_table(c.seed, c.dimension, c.num_simhash_projections, c.num_repetitions)
        if c.projection_type == "ams_sketch":
            self.ams_index, self.ams_sign = ams_table(c.seed, c.dimension, c.projection_dim, c.num_repetitions)
            dense = np.zeros((c.num_repetitions, c.dimension, c.projection_dim), np.float32)
            r_i, d_i = np.meshgrid(np.arange(c.num_repetitions), np.arange(c.dimension), indexing="ij")
            dense[r_i, d_i, self.ams_index] = self.ams_sign
            self.ams_dense = dense
        else:
            self.ams_index = self.ams_sign = self.ams_dense = None
        if c.final_projection_dimension is not None:
            self.cs_bucket, self.cs_sign = count_sketch_table(c.seed, c.fde_dimension_before_projection,
                                                              c.final_projection_dimension)
        else:
            self.cs_bucket = self.cs_sign = None


def _gray_partition(bits: np.ndarray) -> np.ndarray:
    """bits (n, k) bool, hyperplane 0 first -> Gray-decoded partition index (n,) int64."""
    P = np.zeros(bits.shape[0], np.int64)
    for j in range(bits.shape[1]):
        P = (P << 1) | (bits[:, j].astype(np.int64) ^ (P & 1))
    return P


def _popcount(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.int64)
    c = np.zeros_like(v)
    while np.any(v):
        c += v & 1
        v >>= 1
    return c


def encode_one(points: np.ndarray, config: FDEConfig, tables: Optional[Tables] = None) -> np.ndarray:
    """FDE of one point cloud: points float32 (n, d) -> float32 (output_dimension,)."""
    c = config
    t = tables if tables is not None else Tables(c)
    X = np.ascontiguousarray(points, np.float32).reshape(-1, c.dimension)
    n = X.shape[0]
    R, k, dp, NP = c.num_repetitions, c.num_simhash_projections, c.projection_dim, c.num_partitions
    out = np.zeros(R * NP * dp, np.float32)
    for r in range(R):
        if k > 0:
            S = eigen_matmul(X, t.simhash[r])
            bits = S > 0  # NaN and -0 give 0
            P = _gray_partition(bits)
        else:
            bits = np.zeros((n, 0), bool)
            P = np.zeros(n, np.int64)
        Y = X if c.projection_type == "identity" else eigen_matmul(X, t.ams_dense[r])
        base = r * NP * dp
        blocks = out[base:base + NP * dp].reshape(NP, dp)
        counts = np.zeros(NP, np.float32)
        for p in range(n):  # input order, float32
            blocks[P[p]] = blocks[P[p]] + Y[p]
            counts[P[p]] += np.float32(1)
        if c.is_document:
            code = np.zeros(n, np.int64)
            for j in range(k):
                code = (code << 1) | bits[:, j].astype(np.int64)
            for q in range(NP):
                if counts[q] == 0:
                    # k == 0 with no points: the reference divides 0 by 0; we keep zeros (docs/ops/fde.md, "Algorithm")
                    if k > 0 and c.fill_empty_partitions and n > 0:
                        dist = _popcount(code ^ (q ^ (q >> 1)))
                        blocks[q] = Y[int(np.argmin(dist))]  # argmin: first minimum = lowest index
                    continue
                blocks[q] = blocks[q] / counts[q]
    if c.final_projection_dimension is not None:
        return _count_sketch_batch(out[None, :], t.cs_bucket, t.cs_sign, c.final_projection_dimension)[0]
    return out


def _count_sketch_batch(V: np.ndarray, bucket: np.ndarray, sign: np.ndarray, D: int) -> np.ndarray:
    """Count sketch of rows of V (B, L): ascending input index within each bucket, float32, vectorised over rows."""
    offsets, members, signs = count_sketch_csr(bucket, sign, D)
    out = np.zeros((V.shape[0], D), np.float32)
    counts = np.diff(offsets)
    # position-within-bucket rounds: round t adds the t-th member of every bucket
    for t in range(int(counts.max()) if D else 0):
        have = np.nonzero(counts > t)[0]
        m = members[offsets[have] + t]
        out[:, have] = out[:, have] + signs[offsets[have] + t][None, :] * V[:, m]
    return out


def encode(points: np.ndarray, offsets: np.ndarray, config: FDEConfig, tables: Optional[Tables] = None) -> np.ndarray:
    """Batched FDE: points float32 (N_total, d), offsets int64 (B+1,) -> float32 (B, output_dimension)."""
    t = tables if tables is not None else Tables(config)
    offsets = np.asarray(offsets, np.int64)
    B = len(offsets) - 1
    if config.final_projection_dimension is None:
        out = np.zeros((B, config.output_dimension), np.float32)
        for b in range(B):
            out[b] = encode_one(points[offsets[b]:offsets[b + 1]], config, t)
        return out
    raw_cfg = config.replace(final_projection_dimension=None)
    raw = np.zeros((B, raw_cfg.output_dimension), np.float32)
    for b in range(B):
        raw[b] = encode_one(points[offsets[b]:offsets[b + 1]], raw_cfg, t)
    return _count_sketch_batch(raw, t.cs_bucket, t.cs_sign, config.final_projection_dimension)


# ---------------------------------------------------------------------------
# Chamfer (MaxSim)


def chamfer(q_points, q_offsets, d_points, d_offsets) -> np.ndarray:
    """Chamfer similarity: S[a, b] = sum over query a's points of max over doc b's points of <q, x>.

    An empty query scores 0; an empty document contributes -inf per query point
    (so 0 for an empty query, -inf otherwise). float64 accumulation, float32 result.
    """
    q = np.asarray(q_points, np.float64)
    x = np.asarray(d_points, np.float64)
    qo = np.asarray(q_offsets, np.int64)
    do = np.asarray(d_offsets, np.int64)
    S = np.zeros((len(qo) - 1, len(do) - 1), np.float64)
    for a in range(len(qo) - 1):
        qa = q[qo[a]:qo[a + 1]]
        if len(qa) == 0:
            continue
        for b in range(len(do) - 1):
            xb = x[do[b]:do[b + 1]]
            S[a, b] = (qa @ xb.T).max(axis=1).sum() if len(xb) else -np.inf
    return S.astype(np.float32)


# ---------------------------------------------------------------------------
# Test vectors (docs/ops/fde.md, "Check values and test vectors")


def spec_points(n: int, d: int, salt: int) -> np.ndarray:
    """The contract's portable exact-dyadic input generator: float32 (n, d)."""
    p = np.arange(n, dtype=np.uint64)[:, None]
    i = np.arange(d, dtype=np.uint64)[None, :]
    h = (p * np.uint64(1000003) + i * np.uint64(7919) + np.uint64(salt * 104729)) & np.uint64(_M32)
    h = (h * np.uint64(2654435761)) & np.uint64(_M32)
    h ^= h >> np.uint64(16)
    return (((h % np.uint64(2001)).astype(np.float64) - 1000.0) / 1024.0).astype(np.float32)
