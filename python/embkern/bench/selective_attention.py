"""Benchmark workloads of selective attention (SSA), fp32, causal (issue sizes).

Sizes: B = 4, H = 8, d = dv = 64, L = 1024 (``--quick``) and also 4096, with
position- and token-aware query temperatures and value temperatures drawn in
[0.5, 1.5].

Cases (each times every available embkern backend on the same inputs):

* ``forward L=...``: the attention output.
* ``forward+backward L=...``: output, then gradients of q, k, v, tau_q and tau_v
  from one random output gradient.
* ``decode 1 x 4096``: one query token against a 4096-token cache (q_offset =
  4095), forward. Its second anchor, ``sdpa, v*tau_v cached``, is SDPA on a
  cache that already holds ``v * tau_v`` (made once in setup), as a decoder
  built on SDPA would keep it; the 1.2x target is measured against that one.
* ``layer decode 1 x 4096``: the same step through ``embkern.nn.SelectiveSelfAttention``
  and its ``KVCache`` (projections, temperatures, the append, the attention), next to
  a vanilla layer with the same projections on SDPA, its cache kept as Hugging Face's
  StaticCache does (a buffer written in place) and as its DynamicCache does
  (``torch.cat`` every step). Untargeted: it shows what the layer adds to the kernel.

Anchors:

* ``sdpa(q*tau_q, v*tau_v)``: ``torch.nn.functional.scaled_dot_product_attention``
  on pre-scaled inputs, with autograd -- exact for SSA (docs/ops/selective_attention.md,
  "Why pre-scaling is exact"), fused on the CPU. Targets: fused backends within
  1.0x of it for forward+backward, 1.2x for decode.
* ``authors (materialised)``: scores materialised, temperature on the scaled
  logits, causal mask, softmax, P @ V (``reference.authors_attention``), as the
  authors' code does. Target: >= 5x faster at L = 1024; peak memory is shown
  next to it at L = 4096.

``extra_report``: a small character LM on gensim's ``head500.noblanks.cor``
(:mod:`embkern.contrib.char_lm`), trained the same steps with vanilla attention
and with SSA through embkern; the loss curves go in the chart, side by side.

The reference materialises the same (B, H, L, L) scores as the authors'
formulation (plus the float64 copy for the error column); at L = 4096 it is
not timed. ``EMBKERN_BENCH_TINY=1`` shrinks every size for the test-suite.
"""

from __future__ import annotations

from typing import List

import torch

from .. import _backends
from ..ops import selective_attention as ssa_ops
from ..reference import selective_attention as ref
from .workload import Target, Workload, tiny


def _sizes(quick: bool):
    if tiny():
        return dict(B=1, H=2, d=16, lengths=(32,), decode=64)
    return dict(B=4, H=8, d=64, lengths=(1024,) if quick else (1024, 4096), decode=4096)


class _Data:
    """Inputs of one (B, H, Lq, Lk, d) case, made in setup and freed in teardown."""

    def __init__(self, B, H, Lq, Lk, d, device, seed):
        self.shape = (B, H, Lq, Lk, d)
        self.device, self.seed = device, seed
        self.t = {}

    def setup(self):
        B, H, Lq, Lk, d = self.shape
        g = torch.Generator().manual_seed(self.seed)
        q = torch.randn(B, H, Lq, d, generator=g)
        k = torch.randn(B, H, Lk, d, generator=g)
        v = torch.randn(B, H, Lk, d, generator=g)
        tq = 0.5 + torch.rand(B, H, Lq, generator=g)
        tv = 0.5 + torch.rand(B, H, Lk, generator=g)
        go = torch.randn(B, H, Lq, d, generator=g)
        # update, not rebind: the case callables hold this dict
        self.t.update({n: x.to(self.device) for n, x in zip(("q", "k", "v", "tq", "tv", "go"), (q, k, v, tq, tv, go))})
        # A decoder that runs SDPA keeps v * tau_v in its cache (tau_v of a cached
        # token never changes): the decode anchor reads this tensor, made once here.
        self.t["v_scaled"] = self.t["v"] * self.t["tv"][..., None]

    def teardown(self):
        self.t.clear()

    def leaves(self):
        return [self.t[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v", "tq", "tv")]


def _fast_backends(device) -> List[str]:
    return ["cpu"] if device.type == "cpu" else ["triton", "cuda"]


def _availability(device, kernels):
    run, skipped = ["reference"], {}
    for be in _fast_backends(device):
        if be not in ssa_ops.DESCRIPTOR.backends:
            skipped[be] = f"selective_attention has no {be} kernels yet"
            continue
        st = _backends.check(ssa_ops.DESCRIPTOR, be, kernels, device.type, torch.float32)
        if st.ok:
            run.append(be)
        else:
            skipped[be] = st.reason
    return run, skipped


def _sdpa(q, k, v, tq, tv, causal=True, q_offset=None):
    Lq, Lk = q.shape[2], k.shape[2]
    if causal and Lq != Lk:  # SDPA's is_causal aligns to the top-left; pass the bottom-right mask
        mask = ref.visible(Lq, Lk, True, Lk - Lq if q_offset is None else q_offset, q.device)
        return torch.nn.functional.scaled_dot_product_attention(q * tq[..., None], k, v * tv[..., None],
                                                                attn_mask=mask)
    return torch.nn.functional.scaled_dot_product_attention(q * tq[..., None], k, v * tv[..., None],
                                                            is_causal=causal)


def _max_abs(out, want) -> float:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    wants = want if isinstance(want, (tuple, list)) else (want,)
    return max(float((o.detach().double() - w).abs().max()) for o, w in zip(outs, wants) if o is not None)


def _forward_case(data: _Data, L: int, with_reference: bool) -> Workload:
    B, H, _, _, d = data.shape
    run, skipped = _availability(data.device, ssa_ops.DESCRIPTOR.kernels_of("selective_attention")[:1])
    if not with_reference:
        run.remove("reference")
        skipped["reference"] = (f"materialises (B, H, L, L) = {B * H * L * L * 4 / 2**30:.1f} GiB of fp32 scores "
                                "(and its float64 twin for the error column), like the authors' row")
    t = data.t

    def call(be):
        return lambda: ssa_ops.selective_attention(t["q"], t["k"], t["v"], t["tq"], t["tv"], backend=be)

    def ref64():
        return ref.attention(*(t[n].double() for n in ("q", "k", "v", "tq", "tv")))

    flops = 4.0 * B * H * L * L * d / 2  # causal: half of 4 B H L^2 d
    anchors = {"sdpa(q*tau_q, v*tau_v)": lambda: _sdpa(t["q"], t["k"], t["v"], t["tq"], t["tv"]),
               "authors (materialised)": lambda: ref.authors_attention(t["q"], t["k"], t["v"], t["tq"], t["tv"])}
    return Workload(
        name=f"forward L={L}", group="selective_attention",
        description=f"SSA forward, B={B} H={H} L={L} d=dv={d}, causal, tau_q and tau_v, fp32, {data.device.type}",
        backends={be: call(be) for be in run}, anchors=anchors, primary_anchor="sdpa(q*tau_q, v*tau_v)",
        reference64=ref64 if with_reference else None, error=_max_abs,
        work=flops / 1e9, work_unit="GFLOP/s",
        params={"B": B, "H": H, "L": L, "d": d, "causal": True, "dtype": "float32"},
        targets=[Target("time / authors' materialised (target >= 5x faster)", "authors (materialised)", "time",
                        "speedup", 5.0)],
        skipped=skipped, slow=("authors (materialised)", "reference"), setup=data.setup, teardown=data.teardown)


def _backward_case(data: _Data, L: int, with_reference: bool) -> Workload:
    B, H, _, _, d = data.shape
    run, skipped = _availability(data.device, ssa_ops.DESCRIPTOR.kernels_of("selective_attention"))
    if not with_reference:
        run.remove("reference")
        skipped["reference"] = "materialises (B, H, L, L) scores; see the forward row"
    t = data.t

    def fwd_bwd(fn):
        def f():
            leaves = data.leaves()
            out = fn(*leaves)
            out.backward(t["go"])
            return tuple(x.grad for x in leaves)
        return f

    def ref64():
        leaves = [t[n].double().requires_grad_(True) for n in ("q", "k", "v", "tq", "tv")]
        ref.attention(*leaves).backward(t["go"].double())
        return tuple(x.grad for x in leaves)

    flops = 4.0 * B * H * L * L * d / 2 * 3.5  # forward + backward (2.5x forward)
    anchors = {"sdpa(q*tau_q, v*tau_v)": fwd_bwd(_sdpa)}
    if with_reference:
        anchors["authors (materialised)"] = fwd_bwd(ref.authors_attention)
    else:
        skipped["authors (materialised)"] = (f"autograd keeps ~5 (B, H, L, L) fp32 tensors = "
                                             f"{5 * B * H * L * L * 4 / 2**30:.0f} GiB; its forward row shows the "
                                             "memory")
    return Workload(
        name=f"forward+backward L={L}", group="selective_attention",
        description=f"SSA forward + backward (grads of q, k, v, tau_q, tau_v), B={B} H={H} L={L} d=dv={d}, "
                    f"causal, fp32, {data.device.type}",
        backends={be: fwd_bwd(lambda *a, be=be: ssa_ops.selective_attention(*a, backend=be)) for be in run},
        anchors=anchors, primary_anchor="sdpa(q*tau_q, v*tau_v)",
        reference64=ref64 if with_reference else None, error=_max_abs,
        work=flops / 1e9, work_unit="GFLOP/s",
        params={"B": B, "H": H, "L": L, "d": d, "causal": True, "dtype": "float32"},
        targets=[Target("time / sdpa(q*tau_q, v*tau_v) fwd+bwd (target <= 1.0)", "sdpa(q*tau_q, v*tau_v)", "time",
                        "ratio", 1.0),
                 Target("time / authors' materialised fwd+bwd (target >= 5x faster)", "authors (materialised)",
                        "time", "speedup", 5.0)],
        skipped=skipped, slow=("authors (materialised)", "reference"), setup=data.setup, teardown=data.teardown)


def _decode_case(data: _Data) -> Workload:
    B, H, _, Lk, d = data.shape
    run, skipped = _availability(data.device, ssa_ops.DESCRIPTOR.kernels_of("selective_attention")[:1])
    t = data.t

    def call(be):
        return lambda: ssa_ops.selective_attention(t["q"], t["k"], t["v"], t["tq"], t["tv"], backend=be)

    def ref64():
        return ref.attention(*(t[n].double() for n in ("q", "k", "v", "tq", "tv")))

    return Workload(
        name=f"decode 1 x {Lk}", group="selective_attention",
        description=f"one query token against a {Lk}-token cache (q_offset = {Lk - 1}), B={B} H={H} d={d}, fp32",
        backends={be: call(be) for be in run},
        anchors={"sdpa(q*tau_q, v*tau_v)": lambda: _sdpa(t["q"], t["k"], t["v"], t["tq"], t["tv"]),
                 "sdpa, v*tau_v cached": lambda: torch.nn.functional.scaled_dot_product_attention(
                     t["q"] * t["tq"][..., None], t["k"], t["v_scaled"])},
        reference64=ref64, error=_max_abs, work=4.0 * B * H * Lk * d / 1e9, work_unit="GFLOP/s",
        params={"B": B, "H": H, "Lq": 1, "Lk": Lk, "d": d, "dtype": "float32"},
        # Against the cache SDPA would really read (v already scaled): the
        # first anchor also pays the v * tau_v product every step.
        targets=[Target("time / sdpa on the same cache, v*tau_v cached (target <= 1.2)", "sdpa, v*tau_v cached",
                        "time", "ratio", 1.2)],
        skipped=skipped, setup=data.setup, teardown=data.teardown)


class _LayerData:
    """A :class:`embkern.nn.SelectiveSelfAttention` (d_model = H d) with a KVCache prefilled with Lk tokens,
    the next token's input, and the same projections' cache for the vanilla SDPA layers; made in setup."""

    def __init__(self, B, H, Lk, d, device, seed):
        self.shape = (B, H, Lk, d)
        self.device, self.seed = device, seed
        self.t = {}

    def setup(self):
        from ..nn import KVCache, SelectiveSelfAttention

        B, H, Lk, d = self.shape
        torch.manual_seed(self.seed)
        layer = SelectiveSelfAttention(H * d, H, device=self.device).eval()
        with torch.no_grad():
            for temp in (layer.core.tau_q, layer.core.tau_v):  # both temperature terms active
                temp.u.normal_(0.0, 0.3)
                temp.beta.fill_(0.5)
            cache = KVCache()
            layer(torch.randn(B, Lk, H * d, device=self.device), cache)
            # the vanilla layers' own cache: as Hugging Face's DynamicCache (concatenated every step) and as a
            # StaticCache (a buffer of Lk + 1 slots written in place)
            static_k = torch.empty(B, H, Lk + 1, d, device=self.device)
            static_v = torch.empty_like(static_k)
            static_k[:, :, :Lk], static_v[:, :, :Lk] = cache.k, cache.v
        self.t.update(layer=layer, cache=cache, x=torch.randn(B, 1, H * d, device=self.device),
                      k=cache.k.contiguous(), v=cache.v.contiguous(), static_k=static_k, static_v=static_v)

    def teardown(self):
        self.t.clear()


def _layer_decode_case(data: _LayerData) -> Workload:
    """One decode step through the layer: projections, temperatures, the cache append, the attention."""
    B, H, Lk, d = data.shape
    run, skipped = _availability(data.device, ssa_ops.DESCRIPTOR.kernels_of("selective_attention")[:1])
    t = data.t

    def call(be):
        def step():
            layer, cache = t["layer"], t["cache"]
            layer.core.backend = be
            with torch.no_grad():
                out = layer(t["x"], cache)
            cache.crop(Lk)  # the next repeat appends the same token again
            return out
        return step

    def vanilla(static: bool):
        def step():
            layer, x = t["layer"], t["x"]
            with torch.no_grad():
                q, k, v = (p(x).view(B, 1, H, d).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
                if static:
                    t["static_k"][:, :, Lk:], t["static_v"][:, :, Lk:] = k, v
                    k, v = t["static_k"], t["static_v"]
                else:
                    k, v = torch.cat([t["k"], k], 2), torch.cat([t["v"], v], 2)
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                return layer.o_proj(o.transpose(1, 2).reshape(B, 1, H * d))
        return step

    def ref64():
        import copy

        from ..nn import KVCache

        layer, cache = copy.deepcopy(t["layer"]).double(), KVCache()
        layer.core.backend = "reference"
        with torch.no_grad():
            cache.append(t["cache"].k.double(), t["cache"].v.double(), t["cache"].tau_v.double())
            return layer(t["x"].double(), cache)

    return Workload(
        name=f"layer decode 1 x {Lk}", group="SelectiveSelfAttention",
        description=f"one token through embkern.nn.SelectiveSelfAttention (d_model {H * d}, {H} heads) with a "
                    f"KVCache of {Lk} tokens, B={B}, fp32: projections, temperatures, cache append, attention",
        backends={be: call(be) for be in run},
        anchors={"vanilla layer, sdpa, static cache": vanilla(True),
                 "vanilla layer, sdpa, cache by torch.cat": vanilla(False)},
        reference64=ref64, error=_max_abs, no_error=("vanilla layer, sdpa, static cache",
                                                      "vanilla layer, sdpa, cache by torch.cat"),
        params={"B": B, "H": H, "Lk": Lk, "d": d, "dtype": "float32"},
        skipped=skipped, setup=data.setup, teardown=data.teardown)


def workloads(quick: bool, device) -> List[Workload]:
    s = _sizes(quick)
    B, H, d = s["B"], s["H"], s["d"]
    out = []
    for i, L in enumerate(s["lengths"]):
        with_reference = L <= 1024 or tiny()
        out.append(_forward_case(_Data(B, H, L, L, d, device, 10 + i), L, with_reference))
        out.append(_backward_case(_Data(B, H, L, L, d, device, 20 + i), L, with_reference))
    out.append(_decode_case(_Data(B, H, 1, s["decode"], d, device, 30)))
    out.append(_layer_decode_case(_LayerData(B, H, s["decode"], d, device, 31)))
    notes = ["max err: max |output (or every gradient) - float64 reference|",
             "the authors' materialised formulation is the attention of their code; its temperature there is "
             "position-only, here the same tau_q tensor is used by every row"]
    for w in out:
        w.notes = list(notes)
    return out


def extra_report(quick: bool) -> dict:
    """Vanilla vs SSA loss curves of the char LM on real text (:func:`embkern.contrib.char_lm.bench_report`)."""
    title = "char LM on head500.noblanks.cor: vanilla vs selective attention"
    try:
        from ..contrib import char_lm
    except Exception as exc:
        return {"title": title, "rows": [], "panels": [], "notes": [f"skipped: {type(exc).__name__}: {exc}"]}
    fast = [be for be in ("cpu",) if be in ssa_ops.DESCRIPTOR.backends and _backends.check(
        ssa_ops.DESCRIPTOR, be, ssa_ops.DESCRIPTOR.kernels, "cpu", torch.float32).ok]
    return char_lm.bench_report(title, ("vanilla", "ssa"), fast, quick, tiny(), "EMBKERN_SSA_LM_PNG")
