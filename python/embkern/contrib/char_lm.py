"""A small causal character-level LM on real text, trained with different attentions (a study).

The text is gensim's ``head500.noblanks.cor`` (500 stemmed Wikipedia articles,
2.3 MB, shipped in the gensim wheel; read as a file, gensim is never
imported). Both models are the same pre-norm transformer (embedding, learned
positions, ``n_layers`` blocks of attention + GELU MLP, tied output), trained
with the same seed, batches and optimizer; only the attention differs:

* ``vanilla`` (MHA): ``scaled_dot_product_attention`` (causal);
* ``ssa``: :class:`embkern.nn.SelectiveSelfAttention` (query and value
  temperatures, position- and token-aware, ``expexp`` gate with the authors'
  pre-training ``beta = 1.5``), through ``embkern.selective_attention``;
* ``rmha`` / ``rcmha``: :class:`embkern.nn.RelConvMultiHeadAttention` without /
  with the shared causal depthwise convs, through ``embkern.relative_attention``.

:func:`train_models` returns every loss curve (and the held-out loss at the
end); :func:`plot_curves` draws them side by side. Running a model once per
backend from the same seed checks that kernel and reference give the same
curve to rounding.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import Progress
from ..nn.rel_conv_attention import RelConvMultiHeadAttention
from ..nn.selective_attention import SelectiveSelfAttention

INSTALL_HINT = "pip install --no-deps gensim   (only its test data file is read)"
ATTENTIONS = ("vanilla", "ssa", "rmha", "rcmha")


def corpus_path() -> Optional[str]:
    """The ``head500.noblanks.cor`` file of an installed gensim wheel, or None."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.origin:
        return None
    p = os.path.join(os.path.dirname(spec.origin), "test", "test_data", "head500.noblanks.cor")
    return p if os.path.exists(p) else None


def load_text(max_chars: Optional[int] = None) -> str:
    p = corpus_path()
    if p is None:
        raise FileNotFoundError(f"head500.noblanks.cor ships in the gensim wheel: {INSTALL_HINT}")
    with open(p, encoding="utf-8") as f:
        text = f.read(max_chars) if max_chars else f.read()
    return text


class _Vanilla(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = (t.view(B, L, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, C))


class _RelAttn(nn.Module):
    def __init__(self, d: int, heads: int, conv, context: int, backend):
        super().__init__()
        self.attn = RelConvMultiHeadAttention(d, heads, conv=conv, max_distance=context, backend=backend)

    def forward(self, x):
        return self.attn(x)[0]


class _Block(nn.Module):
    def __init__(self, d: int, attn: nn.Module):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), attn, nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    """Pre-norm character transformer; ``attention`` one of :data:`ATTENTIONS` (with ``backend``)."""

    def __init__(self, vocab: int, context: int, d: int = 64, heads: int = 4, layers: int = 2,
                 attention: str = "ssa", backend: Optional[str] = None):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        for e in (self.tok, self.pos):  # GPT-2's 0.02: N(0, 1) rows would give tied logits of std ~sqrt(d)
            nn.init.normal_(e.weight, std=0.02)

        def attn():
            if attention == "vanilla":
                return _Vanilla(d, heads)
            if attention in ("rmha", "rcmha"):
                return _RelAttn(d, heads, "shared" if attention == "rcmha" else None, context, backend)
            return SelectiveSelfAttention(d, heads, gate="expexp", beta_init=1.5, backend=backend)

        self.blocks = nn.ModuleList(_Block(d, attn()) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.ln(x) @ self.tok.weight.T


def train_models(models: Sequence[str] = ("vanilla", "ssa"), steps: int = 200, batch: int = 16,
                 context: int = 128, d: int = 64, heads: int = 4, layers: int = 2, lr: float = 3e-3, seed: int = 0,
                 backends: Sequence[Optional[str]] = (None,), max_chars: int = 400_000,
                 progress: bool = True) -> Dict:
    """Train each of ``models`` (names in :data:`ATTENTIONS`) on the same batches; every model but
    ``vanilla`` once per entry of ``backends``.

    Returns ``{"steps", "curves": {name: [loss per step]}, "heldout": {name: loss}, "seconds": {name: s},
    "max_abs_diff_between_backends": {model: float} ...}``; names are ``"vanilla"`` and
    ``"<model>[<backend>]"``.
    """
    for m in models:
        if m not in ATTENTIONS:
            raise ValueError(f"models: expected names in {ATTENTIONS}, got {m!r}")
    text = load_text(max_chars)
    chars = sorted(set(text))
    table = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([table[c] for c in text], dtype=torch.int64)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - context - 1, (steps, batch), generator=g)
    hstarts = torch.randint(0, len(held) - context - 1, (8, batch), generator=g)

    def batch_of(src, s):
        idx = s[:, None] + torch.arange(context + 1)
        chunk = src[idx]
        return chunk[:, :-1], chunk[:, 1:]

    runs = []
    for m in models:
        runs += [("vanilla", "vanilla", None)] if m == "vanilla" else [(f"{m}[{b or 'auto'}]", m, b) for b in backends]
    curves: Dict[str, List[float]] = {}
    heldout, seconds = {}, {}
    bar = Progress(steps * len(runs), desc="char_lm", unit="step", enabled=progress)
    for name, attention, be in runs:
        torch.manual_seed(seed)
        model = CharLM(len(chars), context, d, heads, layers, attention, be)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        losses = []
        t0 = time.perf_counter()
        for s in range(steps):
            x, y = batch_of(train, starts[s])
            loss = F.cross_entropy(model(x).reshape(-1, len(chars)), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.set(f"{name} step {s + 1} loss {losses[-1]:.3f}")
            bar.update()
        seconds[name] = time.perf_counter() - t0
        with torch.no_grad():
            hl = [float(F.cross_entropy(model(x).reshape(-1, len(chars)), y.reshape(-1)))
                  for x, y in (batch_of(held, hs) for hs in hstarts)]
        heldout[name] = sum(hl) / len(hl)
        curves[name] = losses
    bar.close()
    diff = {}
    for m in models:
        names = [n for n in curves if n.startswith(m + "[")]
        if len(names) > 1:
            diff[m] = max(abs(a - b) for n in names[1:] for a, b in zip(curves[names[0]], curves[n]))
    return {"steps": steps, "batch": batch, "context": context, "d": d, "heads": heads, "layers": layers,
            "vocab": len(chars), "chars": len(text), "curves": curves, "heldout": heldout, "seconds": seconds,
            "max_abs_diff_between_backends": diff}


def plot_curves(result: Dict, path: str) -> str:
    """PNG of the loss curves side by side with the held-out losses; returns the path."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for name, ys in result["curves"].items():
        ax1.plot(range(1, len(ys) + 1), ys, label=name, lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (nats/char)")
    ax1.set_title(f"char LM on head500.noblanks.cor ({result['layers']} layers, d={result['d']})")
    ax1.legend()
    ax1.grid(alpha=0.3)
    names = list(result["heldout"])
    vals = [result["heldout"][n] for n in names]
    ax2.bar(names, vals, color=["C%d" % i for i in range(len(names))])
    for i, val in enumerate(vals):
        ax2.text(i, val, f"{val:.4f}", ha="center", va="bottom")
    ax2.set_ylim(0.95 * min(vals), 1.02 * max(vals))
    ax2.set_ylabel("held-out loss after training")
    ax2.set_title("held-out (10% of the text)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def bench_report(title: str, models: Sequence[str], fast_backends: Sequence[str], quick: bool, tiny: bool,
                 png_env: str) -> Dict:
    """The ``extra_report`` of an attention op's bench: train ``models`` on the reference and on each of
    ``fast_backends``, print first / last / held-out losses, chart the curves (and draw them to the path
    in the environment variable ``png_env``, when set)."""
    if corpus_path() is None:
        return {"title": title, "rows": [], "panels": [], "notes": [f"skipped: no gensim data ({INSTALL_HINT})"]}
    kw = dict(steps=3, batch=2, context=16, d=16, max_chars=20_000) if tiny else dict(steps=150 if quick else 600)
    res = train_models(models, backends=["reference", *fast_backends], progress=not tiny, **kw)
    rows = [{"model": n, "first loss": c[0], "last loss": c[-1], "held-out loss": res["heldout"][n],
             "train s": res["seconds"][n]} for n, c in res["curves"].items()]
    notes = [f"{res['steps']} steps of batch {res['batch']} x {res['context']} chars, {res['layers']} layers, "
             f"d={res['d']}, {res['heads']} heads, same seed and batches for every model; vanilla = MHA (SDPA)"]
    for m, diff in res["max_abs_diff_between_backends"].items():
        notes.append(f"{m}: max |loss difference| between backends {diff:.2e} over all steps")
    if not fast_backends:
        notes.append("ran on the reference only: no fast backend of the op here to compare the curves with")
    panels = [{"title": title, "kind": "line", "x": list(range(1, res["steps"] + 1)), "series": res["curves"],
               "xlabel": "step", "ylabel": "training loss (nats/char)"}]
    png = os.environ.get(png_env)
    if png:
        plot_curves(res, png)
        notes.append(f"curves also drawn to {png}")
    return {"title": title, "rows": rows, "panels": panels, "notes": notes}
