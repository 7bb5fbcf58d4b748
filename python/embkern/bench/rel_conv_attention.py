"""Benchmark workloads of relative (Transformer-XL) attention, the core of RCMHA, fp32, causal (issue sizes).

Sizes: B = 4, H = 8, d = dv = 64, the tables' half-width P = 4096, L = 1024
(``--quick``), and also 2048 and 4096 in the full run; R, S, u drawn with
std 0.3 (zero tables would reduce the relative terms to nothing).

Cases: ``forward L=...`` and ``forward+backward L=...`` (gradients of q, k, v,
R, S and u from one random output gradient), ``decode 1 x 1024`` (one query,
the newest position, against 1024 cached keys; untargeted), and ``layer decode 1 x 1024``:
one token through ``embkern.nn.RelConvMultiHeadAttention`` (RCMHA, shared
conv, d_model 512, memory 1024 rows) with its ``RelConvCache``, next to the
same layer given its memory as hidden states (what Transformer-XL does: it
projects and convolves the whole memory again every step) and to a vanilla
SDPA layer with a static KV cache (no relative terms, no conv). Untargeted:
it shows what the layer adds to the kernel.

Anchors:

* ``sdpa (no relative terms)``: ``scaled_dot_product_attention`` of the same
  q, k, v -- the ceiling. Target: >= 60% of its forward+backward throughput.
* ``authors (materialised)``: the relative term for every (query, table row),
  realigned with Transformer-XL's shift (``reference.authors_attention``).
  Target: >= 10x faster at L = 1024. Run up to L = 2048: at L = 4096 its
  (Lq, Lk + Lq, B, H) relative-score tensor alone is 4 GiB.

Backends: the reference and every fused backend the descriptor has (``cpu``:
the C++ kernels, about 1.63x plain attention's FLOPs forward and 1.71x
forward + backward by design, docs/ops/rel_conv_attention.md). Peak extra
memory is shown next to the size of the authors' (L, 2L, B, H) float32
relative-score tensor, at every L (theirs grows with L^2, the fused kernels'
with L d).

The reference gathers from ``q R^T`` over the rows it reads, (B, H, L, 2L): it
is timed at L = 1024 only. ``EMBKERN_BENCH_TINY=1`` shrinks every size.
"""

from __future__ import annotations

from typing import List

import torch

from .. import _backends
from ..ops import rel_conv_attention as rca_ops
from ..reference import rel_conv_attention as ref
from .workload import Target, Workload, tiny


def _sizes(quick: bool):
    if tiny():
        return dict(B=1, H=2, d=16, P=64, lengths=(32,), decode=48)
    return dict(B=4, H=8, d=64, P=4096, lengths=(1024,) if quick else (1024, 2048, 4096), decode=1024)


class _Data:
    """q (B, H, Lq, d) (Lq = L unless given: one query at decode), k and v (B, H, L, d), the tables."""

    def __init__(self, B, H, L, d, P, device, seed, Lq=None):
        self.shape, self.P, self.device, self.seed = (B, H, L, d), P, device, seed
        self.Lq = L if Lq is None else Lq
        self.t = {}

    def setup(self):
        B, H, L, d = self.shape
        g = torch.Generator().manual_seed(self.seed)
        P, Lq = self.P, self.Lq
        vals = {"q": torch.randn(B, H, Lq, d, generator=g), "k": torch.randn(B, H, L, d, generator=g),
                "v": torch.randn(B, H, L, d, generator=g), "R": torch.randn(2 * P, H, d, generator=g) * 0.3,
                "S": torch.randn(2 * P, H, generator=g) * 0.3, "u": torch.randn(H, d, generator=g) * 0.3,
                "go": torch.randn(B, H, Lq, d, generator=g)}
        self.t.update({n: x.to(self.device) for n, x in vals.items()})  # update: the callables hold this dict

    def teardown(self):
        self.t.clear()

    def args(self):
        return tuple(self.t[n] for n in ("q", "k", "v", "R", "S", "u"))

    def leaves(self):
        return [x.detach().clone().requires_grad_(True) for x in self.args()]


def _availability(device, kernels):
    run, skipped = ["reference"], {}
    for be in (["cpu"] if device.type == "cpu" else ["triton", "cuda"]):
        if be not in rca_ops.DESCRIPTOR.backends:
            skipped[be] = f"rel_conv_attention has no {be} kernels yet"
            continue
        st = _backends.check(rca_ops.DESCRIPTOR, be, kernels, device.type, torch.float32)
        if st.ok:
            run.append(be)
        else:
            skipped[be] = st.reason
    return run, skipped


def _max_abs(out, want) -> float:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    wants = want if isinstance(want, (tuple, list)) else (want,)
    return max(float((o.detach().double() - w).abs().max()) for o, w in zip(outs, wants) if o is not None)


def _sdpa(q, k, v, *rest):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def relative_bias(q, R, S, Lk: int, q_offset=None):
    """The relative term as a dense tensor: (B, H, Lq, Lk) ``q_i . R[r_ij] + S[r_ij]`` (not yet scaled), with
    ``r_ij = P + j - i - q_offset`` -- what a generic attention kernel needs precomputed to run Transformer-XL
    attention. Built from ``q Rw^T`` over the Lq + Lk - 1 table rows the pairs read (B, H, Lq, Lq + Lk - 1) and
    a gather: O(L^2) memory, differentiable in q, R and S. Rows outside the table (read only by pairs that a
    valid call masks) are clamped into it."""
    B, H, Lq, d = q.shape
    P = R.shape[0] // 2
    qo = Lk - Lq if q_offset is None else int(q_offset)
    lo = P - qo - (Lq - 1)
    rows = (lo + torch.arange(Lq + Lk - 1, device=q.device)).clamp(0, 2 * P - 1)
    qr = torch.einsum("bhid,whd->bhiw", q, R[rows].to(q.dtype)) + S[rows].T.to(q.dtype)[None, :, None, :]
    i = torch.arange(Lq, device=q.device)[:, None]
    j = torch.arange(Lk, device=q.device)[None, :]
    return torch.gather(qr, 3, (j - i + Lq - 1).expand(B, H, Lq, Lk))


def flex_relative_attention(q, k, v, R, S, u, causal: bool = True, q_offset=None, compiled: bool = True):
    """Relative attention through PyTorch's FlexAttention, the issue's GPU anchor: ``(q + u) . k`` as the
    content score, the precomputed :func:`relative_bias` added in ``score_mod`` (its gradient flows back into
    q, R, S through autograd), and the causal ``j <= i + q_offset`` as a block mask. q (B, H, Lq, d), k, v
    (B, H, Lk, d); returns (B, H, Lq, dv). FlexAttention has no backward on the CPU (torch raises there)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    qo = Lk - Lq if q_offset is None else int(q_offset)
    scale = d ** -0.5
    bias = relative_bias(q, R, S, Lk, qo)

    def score_mod(score, b, h, i, j):
        return score + bias[b, h, i, j] * scale

    mask = None
    if causal:  # built once per shape (not per call; it is the same for every batch element and head)
        key = (Lq, Lk, qo, str(q.device))
        if key not in _MASKS:
            _MASKS[key] = create_block_mask(lambda b, h, i, j: j <= i + qo, None, None, Lq, Lk, device=q.device)
        mask = _MASKS[key]
    fn = _compiled_flex(flex_attention) if compiled else flex_attention
    return fn(q + u.to(q.dtype)[None, :, None, :], k, v, score_mod=score_mod, block_mask=mask, scale=scale)


_FLEX = {}
_MASKS = {}


def _compiled_flex(flex_attention):
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _case(data: _Data, L: int, backward: bool) -> Workload:
    B, H, _, d = data.shape
    P = data.P
    kernels = rca_ops.DESCRIPTOR.kernels_of("relative_attention")
    run, skipped = _availability(data.device, kernels if backward else kernels[:1])
    with_reference = L <= 1024 or tiny()
    with_authors = L <= 2048 or tiny()
    if not with_reference:
        run.remove("reference")
        skipped["reference"] = (f"materialises q R^T of (B, H, L, 2L) = {B * H * L * 2 * L * 4 / 2**30:.0f} GiB "
                                "and its float64 twin for the error column")
    t = data.t

    def ours(be):
        return lambda *a: rca_ops.relative_attention(*a, max_distance=P, backend=be)

    def wrap(fn):
        if not backward:
            return lambda: fn(*data.args())

        def f():
            leaves = data.leaves()
            fn(*leaves).backward(t["go"])
            return tuple(x.grad for x in leaves)
        return f

    def ref64():
        args = [x.double() for x in data.args()]
        if not backward:
            return ref.attention(*args)
        leaves = [x.requires_grad_(True) for x in args]
        ref.attention(*leaves).backward(t["go"].double())
        return tuple(x.grad for x in leaves)

    anchors = {"sdpa (no relative terms)": wrap(_sdpa)}
    if with_authors:
        anchors["authors (materialised)"] = wrap(ref.authors_attention)
    else:
        skipped["authors (materialised)"] = (f"its (Lq, Lk + Lq, B, H) relative scores alone are "
                                             f"{L * 2 * L * B * H * 4 / 2**30:.0f} GiB")
    flops = 4.0 * B * H * L * L * d / 2 * (3.5 if backward else 1.0)
    targets = [Target("time / authors' materialised (target >= 10x faster)", "authors (materialised)", "time",
                      "speedup", 10.0)]
    rel_bytes = L * 2 * L * B * H * 4
    targets.append(Target("peak extra memory / the authors' (L, 2L, B, H) relative scores (target <= 1)",
                          "bytes:authors' relative scores", "memory", "ratio", 1.0))
    if backward:
        targets.append(Target("sdpa time / time: share of the ceiling's throughput (target >= 0.6)",
                              "sdpa (no relative terms)", "time", "speedup", 0.6))
    kind = "forward+backward" if backward else "forward"
    return Workload(
        name=f"{kind} L={L}", group="relative_attention",
        description=f"relative attention {kind}, B={B} H={H} L={L} d=dv={d}, P={P}, causal, fp32, "
                    f"{data.device.type}",
        backends={be: wrap(ours(be)) for be in run}, anchors=anchors, primary_anchor="sdpa (no relative terms)",
        reference64=ref64 if with_reference else None, error=_max_abs,
        row_error={}, no_error=("sdpa (no relative terms)",),
        work=flops / 1e9, work_unit="GFLOP/s",
        params={"B": B, "H": H, "L": L, "d": d, "P": P, "causal": True, "dtype": "float32"},
        targets=targets, sizes={"authors' relative scores": rel_bytes}, skipped=skipped, slow=("authors (materialised)", "reference"),
        notes=["sdpa computes no relative terms (not comparable: no error); GFLOP/s counts attention FLOPs only",
               "max err: max |output (or every gradient) - float64 reference|"],
        setup=data.setup, teardown=data.teardown)


def _decode_case(data: _Data) -> Workload:
    """One query (the newest position) against Lk cached keys: the kernel's decode step."""
    B, H, Lk, d = data.shape
    P = data.P
    run, skipped = _availability(data.device, rca_ops.DESCRIPTOR.kernels_of("relative_attention")[:1])

    def ours(be):
        return lambda: rca_ops.relative_attention(*data.args(), max_distance=P, backend=be)

    def sdpa():  # one query at the end sees every key: no mask (is_causal would align it at key 0)
        q, k, v = data.args()[:3]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def ref64():
        return ref.attention(*[x.double() for x in data.args()])

    return Workload(
        name=f"decode 1 x {Lk}", group="relative_attention",
        description=f"relative attention of one query against {Lk} keys (q_offset = Lk - 1), B={B} H={H} d=dv={d}, "
                    f"P={P}, fp32, {data.device.type}",
        backends={be: ours(be) for be in run},
        anchors={"sdpa (no relative terms)": sdpa,
                 "authors (materialised)": lambda: ref.authors_attention(*data.args())},
        primary_anchor="sdpa (no relative terms)", reference64=ref64, error=_max_abs,
        no_error=("sdpa (no relative terms)",), work=4.0 * B * H * Lk * d * 1.5 / 1e9, work_unit="GFLOP/s",
        params={"B": B, "H": H, "Lq": 1, "Lk": Lk, "d": d, "P": P, "dtype": "float32"},
        notes=["decode: sdpa reads k and v, the kernel also R's Lk rows of each head; GFLOP/s counts the content "
               "and position products"],
        skipped=skipped, setup=data.setup, teardown=data.teardown)


class _LayerData:
    """An RCMHA layer (d_model H d, shared conv, random relative tables) with a RelConvCache and the hidden-state
    memory of the same Lk rows, the next token, and a vanilla layer's static K/V cache; made in setup."""

    def __init__(self, B, H, Lk, d, device, seed):
        self.shape, self.device, self.seed = (B, H, Lk, d), device, seed
        self.t = {}

    def setup(self):
        from ..nn import RelConvCache, RelConvMultiHeadAttention

        B, H, Lk, d = self.shape
        torch.manual_seed(self.seed)
        layer = RelConvMultiHeadAttention(H * d, H, conv="shared", memory_len=Lk, max_distance=max(Lk + 1, 64),
                                          device=self.device).eval()
        with torch.no_grad():
            for p in (layer.rel_emb, layer.rel_bias, layer.content_bias):
                p.normal_(0.0, 0.3)
            memory = torch.randn(B, Lk, H * d, device=self.device)
            cache = RelConvCache()
            layer(memory, cache=cache)
            k = layer.w_k(memory).view(B, Lk, H, d).transpose(1, 2)
            v = layer.w_v(memory).view(B, Lk, H, d).transpose(1, 2)
            static_k = torch.empty(B, H, Lk + 1, d, device=self.device)
            static_v = torch.empty_like(static_k)
            static_k[:, :, :Lk], static_v[:, :, :Lk] = k, v
        self.t.update(layer=layer, cache=cache, state=cache._state(), memory=memory,
                      x=torch.randn(B, 1, H * d, device=self.device), static_k=static_k, static_v=static_v)

    def teardown(self):
        self.t.clear()


def _layer_decode_case(data: _LayerData) -> Workload:
    B, H, Lk, d = data.shape
    run, skipped = _availability(data.device, rca_ops.DESCRIPTOR.kernels)
    t = data.t

    def cached(be):
        def step():
            layer, cache = t["layer"], t["cache"]
            layer.backend = be
            with torch.no_grad():
                out = layer(t["x"], cache=cache)[0]
            cache._restore(t["state"])  # the next repeat takes the same step from the same window
            return out
        return step

    def memory_path():
        t["layer"].backend = run[-1]
        with torch.no_grad():
            return t["layer"](t["x"], t["memory"])[0]

    def vanilla():
        layer, x = t["layer"], t["x"]
        with torch.no_grad():
            q, k, v = (p(x).view(B, 1, H, d).transpose(1, 2) for p in (layer.w_q, layer.w_k, layer.w_v))
            t["static_k"][:, :, Lk:], t["static_v"][:, :, Lk:] = k, v
            o = torch.nn.functional.scaled_dot_product_attention(q, t["static_k"], t["static_v"])
            return layer.w_o(o.transpose(1, 2).reshape(B, 1, H * d))

    def ref64():
        import copy

        layer = copy.deepcopy(t["layer"]).double()
        layer.backend = "reference"
        with torch.no_grad():
            return layer(t["x"].double(), t["memory"].double())[0]

    mem_name = f"layer, memory as hidden states ({run[-1]})"
    return Workload(
        name=f"layer decode 1 x {Lk}", group="RelConvMultiHeadAttention",
        description=f"one token through embkern.nn.RelConvMultiHeadAttention (shared conv, d_model {H * d}, {H} "
                    f"heads, memory {Lk} rows) with a RelConvCache, B={B}, fp32: projections, conv, attention",
        backends={be: cached(be) for be in run},
        anchors={mem_name: memory_path, "vanilla layer, sdpa, static cache": vanilla},
        primary_anchor=mem_name, reference64=ref64, error=_max_abs,
        no_error=("vanilla layer, sdpa, static cache",),
        params={"B": B, "H": H, "Lk": Lk, "d": d, "dtype": "float32"},
        notes=["the memory-path anchor is the same layer and output; the vanilla layer computes no relative terms "
               "and no conv (not comparable: no error)"],
        skipped=skipped, setup=data.setup, teardown=data.teardown)


def workloads(quick: bool, device) -> List[Workload]:
    s = _sizes(quick)
    out = []
    for i, L in enumerate(s["lengths"]):
        for backward in (False, True):
            out.append(_case(_Data(s["B"], s["H"], L, s["d"], s["P"], device, 40 + 2 * i + backward), L, backward))
    out.append(_decode_case(_Data(s["B"], s["H"], s["decode"], s["d"], s["P"], device, 48, Lq=1)))
    out.append(_layer_decode_case(_LayerData(s["B"], s["H"], s["decode"], s["d"], device, 50)))
    return out


def _fast_cpu_backends() -> List[str]:
    """The fused backends that run here on fp32 CPU tensors (the cpu kernels, when built)."""
    return [be for be in ("cpu",) if be in rca_ops.DESCRIPTOR.backends and _backends.check(
        rca_ops.DESCRIPTOR, be, rca_ops.DESCRIPTOR.kernels, "cpu", torch.float32).ok]


def long_memory_rows(lengths, B: int = 4, H: int = 8, d: int = 64) -> List[dict]:
    """Peak extra memory and time of one forward+backward call at each L (fp32, causal, P = L, cpu kernel
    and SDPA), next to the size of the authors' (L, 2L, B, H) float32 relative scores, which are not run.

    One call each (at L = 16384 one call is ~30 s on 2 cores); the peak is the CPU meter's
    (:class:`embkern.bench.timing.CpuPeak`) and counts what the call allocates: the leaves' copies,
    the output, the saved state and every gradient."""
    import time

    from . import timing

    meter = timing.CpuPeak()
    if not meter.ok:
        return []
    cpu_ok = "cpu" in _fast_cpu_backends()
    rows = []
    for L in lengths:
        g = torch.Generator().manual_seed(7)
        q, k, v, go = (torch.randn(B, H, L, d, generator=g) for _ in range(4))
        R, S, u = torch.randn(2 * L, H, d, generator=g) * 0.3, torch.randn(2 * L, H, generator=g) * 0.3, \
            torch.randn(H, d, generator=g) * 0.3

        def ours():
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v, R, S, u)]
            rca_ops.relative_attention(*leaves, max_distance=L, backend="cpu").backward(go)
            return [x.grad for x in leaves]

        def sdpa():
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True).backward(go)
            return [x.grad for x in leaves]

        row = {"L": L, "authors' relative scores GiB (not run)": round(L * 2 * L * B * H * 4 / 2**30, 2)}
        for name, fn in (("cpu", ours), ("sdpa", sdpa)) if cpu_ok else (("sdpa", sdpa),):
            t = time.perf_counter()
            out, peak = meter.measure(fn)
            row[f"{name} s"] = round(time.perf_counter() - t, 2)
            row[f"{name} peak +MiB"] = round(peak / 2**20, 1)
            del out
        rows.append(row)
        del q, k, v, go, R, S, u
    return rows


def extra_report(quick: bool) -> dict:
    """MHA vs RMHA vs RCMHA loss curves of the char LM on real text (:func:`embkern.contrib.char_lm.bench_report`),
    and (full runs) the peak memory of one forward+backward at L = 4096 and 16384 (:func:`long_memory_rows`)."""
    title = "char LM on head500.noblanks.cor: MHA vs RMHA vs RCMHA"
    try:
        from ..contrib import char_lm
    except Exception as exc:
        out = {"title": title, "rows": [], "panels": [], "notes": [f"skipped: {type(exc).__name__}: {exc}"]}
    else:
        out = char_lm.bench_report(title, ("vanilla", "rmha", "rcmha"), _fast_cpu_backends(), quick, tiny(),
                                   "EMBKERN_RCMHA_LM_PNG")
    if tiny():
        lengths = (64,)
    elif quick:
        lengths = ()
    else:
        lengths = (4096, 16384)
    if lengths:
        shape = dict(B=1, H=2, d=16) if tiny() else dict(B=4, H=8, d=64)
        mem = long_memory_rows(lengths, **shape)
        out.setdefault("tables", []).append(
            {"title": "peak extra memory of one forward+backward, fp32, causal, "
                      + " ".join(f"{k}={v}" for k, v in shape.items()) + ", P = L", "rows": mem})
        out.setdefault("notes", []).append(
            "long L: ours and sdpa grow with L d (inputs, output, gradients); the authors' formulation "
            "materialises (L, 2L, B, H) relative scores and more, which grow with L^2 and are not run")
    return out
