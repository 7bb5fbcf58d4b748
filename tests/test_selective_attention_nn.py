"""embkern.nn selective attention: the layer, its KV cache (decode = full forward), and conversion of GPT-2 and
nanoGPT-style models with unchanged outputs at step 0."""

import math

import pytest
import torch
from torch import nn

import embkern
from embkern.nn import KVCache, SelectiveSelfAttention, convert_to_selective
from embkern.reference import selective_attention as ref
from helpers import oracle


def _layer(**kw):
    torch.manual_seed(0)
    layer = SelectiveSelfAttention(32, 4, **kw).double()
    with torch.no_grad():  # non-trivial temperatures: the token term and per-position term both active
        for t in (layer.core.tau_q, layer.core.tau_v):
            if t is not None and t.u is not None:
                t.u.normal_()
            if t is not None and t.beta is not None:
                t.beta.fill_(0.5)
    return layer


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"gate": "sigmoid", "per_head_beta": True},
                                {"value_temperature": False, "token_aware": False}])
def test_decoding_with_the_cache_equals_the_full_forward(kw):
    layer = _layer(**kw)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    full = layer(x)
    cache = KVCache()
    steps = [layer(x[:, :4], cache)]  # prefill of 4, then one token at a time
    for t in range(4, 9):
        steps.append(layer(x[:, t:t + 1], cache))
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True])
def test_cache_reorder_keeps_the_chosen_rows_as_beam_search_does(grad):
    # rows 2, 0, 0 of a batch of 3 after a prefix: the next tokens must equal the full forward of those
    # rows' sequences (row 0 twice, with different continuations)
    layer = _layer()
    x = torch.randn(3, 6, 32, dtype=torch.float64)
    idx = [2, 0, 0]
    cont = torch.randn(3, 3, 32, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        cache = KVCache()
        layer(x, cache)
        cache.reorder(torch.tensor(idx))
        assert cache.k.shape[0] == 3 and cache.length == 6
        got = torch.cat([layer(cont[:, t:t + 1], cache) for t in range(3)], dim=1)
        want = layer(torch.cat([x[idx], cont], dim=1))[:, 6:]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cache.reorder([1])  # fewer rows (a finished sequence dropped); a list works too
    assert cache.k.shape[0] == 1 and cache.v.shape[0] == 1
    for bad, exc, match in ((torch.tensor([3]), ValueError, r"index: expected indices in \[0, 1\)"),
                            ([0.5], TypeError, r"index\[0\]: expected an integer batch row, got float"),
                            (torch.zeros(1, 1, dtype=torch.long), ValueError, "index: expected a 1-d list"),
                            ("0", TypeError, "index")):
        with pytest.raises(exc, match=match):
            cache.reorder(bad)
    KVCache().reorder([5])  # an empty cache has no rows to choose: nothing to do


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("capacity", [None, 2, 64])
def test_decoding_without_autograd_writes_into_the_buffers(backend, capacity):
    layer = _layer(n_kv_heads=2, backend=backend)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = KVCache(capacity)
        steps = [layer(x[:, :3], cache)]
        ptrs = {cache.k.data_ptr()}
        caps = [cache._k.shape[2]]
        for t in range(3, 9):
            steps.append(layer(x[:, t:t + 1], cache))
            ptrs.add(cache.k.data_ptr())
            caps.append(cache._k.shape[2])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)
    assert cache.length == 9 and cache.k.shape == (2, 2, 9, 8) and cache.tau_v.shape == (2, 2, 9)
    # the buffers double: 3 -> 6 -> 12 tokens (a capacity of 64 allocates once), each growth one new buffer
    assert caps == ({None: [3, 6, 6, 6, 12, 12, 12], 2: [3, 6, 6, 6, 12, 12, 12], 64: [64] * 7}[capacity])
    assert len(ptrs) == len(set(caps))
    assert not cache.k.is_contiguous() and embkern._checks.packed_below(cache.k, 2)
    k_proj = layer.k_proj(x).view(2, 9, 2, 8).transpose(1, 2)
    torch.testing.assert_close(cache.k, k_proj, rtol=1e-12, atol=1e-12)


def test_cache_with_gradients_concatenates_and_trains_through_every_step():
    layer = _layer()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    cache = KVCache(capacity=16)
    with torch.no_grad():
        layer(x[:, :2], cache)  # a prefix without autograd, then steps that train
    out = torch.cat([layer(x[:, t:t + 1], cache) for t in range(2, 5)], dim=1)
    assert cache.k.requires_grad and cache.length == 5 and cache._k.shape[2] == 5
    out.square().sum().backward()
    assert layer.k_proj.weight.grad is not None and layer.k_proj.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out, layer(x)[:, 2:], rtol=1e-12, atol=1e-12)


def test_cache_filled_under_inference_mode_takes_appends_outside_it():
    layer = _layer()
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    cache = KVCache(capacity=8)
    with torch.inference_mode():
        a = layer(x[:, :3], cache)
    with torch.no_grad():
        b = layer(x[:, 3:], cache)
    torch.testing.assert_close(torch.cat([a, b], 1), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True])
def test_cache_crop_reruns_from_a_prefix(grad):
    layer = _layer()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    y = torch.randn(1, 2, 32, dtype=torch.float64)
    cache = KVCache()
    with torch.set_grad_enabled(grad):
        layer(x[:, :4], cache)
        layer(y, cache)  # a draft of two tokens, rejected
        cache.crop(4)
        assert cache.length == 4 and cache.k.shape[2] == 4
        a = layer(x[:, 4:5], cache)
        layer(y[:, :1], cache)
        cache.crop(-1)
        b = layer(x[:, 5:], cache)
    torch.testing.assert_close(torch.cat([a, b], 1), layer(x)[:, 4:], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="length: expected at most the cached 6 tokens, got 7"):
        cache.crop(7)
    with pytest.raises(TypeError, match="length: expected an int"):
        cache.crop(2.0)


def test_cache_never_writes_into_the_callers_tensors():
    """A first append that needs gradients keeps the caller's tensors; after a crop, a later append without
    autograd must copy them into buffers of its own, not write into them."""
    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    tv = torch.rand(1, 2, 5, requires_grad=True)  # only tau_v needs a gradient
    saved = [t.detach().clone() for t in (k, v, tv)]
    cache = KVCache()
    cache.append(k, v, tv)
    cache.crop(3)
    with torch.no_grad():
        cache.append(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1))
    for t, want in zip((k, v, tv), saved):
        assert torch.equal(t.detach(), want)
    assert cache.length == 4 and torch.equal(cache.k[:, :, :3], k[:, :, :3]) and not cache.k[:, :, 3].any()


def test_cache_bad_appends():
    cache = KVCache()
    with pytest.raises(TypeError, match="v: expected dtype float32 \\(the dtype of k\\)"):  # the first append too
        cache.append(torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="tau_v: expected device cpu"):
        cache.append(torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8), torch.ones(2, 4, 1, device="meta"))
    assert cache.length == 0 and cache.k is None
    k = torch.zeros(2, 4, 3, 8)
    cache.append(k, k, None)
    with pytest.raises(ValueError, match=r"k: expected shape \(2, 4, 'n', 8\)"):
        cache.append(torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8), None)
    with pytest.raises(ValueError, match="v: expected"):
        cache.append(torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 2, 8), None)
    with pytest.raises(TypeError, match="k: expected dtype float32"):
        cache.append(torch.zeros(2, 4, 1, 8, dtype=torch.float64), torch.zeros(2, 4, 1, 8, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="tau_v: expected None as in the earlier appends"):
        cache.append(torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8), torch.ones(2, 4, 1))
    with pytest.raises(TypeError, match="capacity: expected an int"):
        KVCache(2.5)
    assert cache.length == 3  # nothing of a rejected append was kept
    cache.reset()
    assert cache.length == 0 and cache.k is None
    cache.append(torch.zeros(1, 1, 2, 4, dtype=torch.float64), torch.zeros(1, 1, 2, 4, dtype=torch.float64),
                 torch.ones(1, 1, 2, dtype=torch.float64))
    assert cache.tau_v.shape == (1, 1, 2)


def test_layer_matches_a_by_hand_computation():
    layer = _layer()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    B, L, H, hd = 1, 5, 4, 8
    q, k, v = (p(x).view(B, L, H, hd).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    n = torch.arange(1, L + 1, dtype=torch.float64)

    def tau(x, t):
        g = torch.exp(-torch.exp(t.beta))
        return 1 + g * torch.log(n) + torch.tanh((torch.nn.functional.gelu(x) * t.u[None, :, None, :]).sum(-1))

    tq, tv = tau(q, layer.core.tau_q), tau(v, layer.core.tau_v)
    S = tq[..., None] * (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    S = S.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    o = torch.softmax(S, -1) @ (tv[..., None] * v)
    want = layer.o_proj(o.transpose(1, 2).reshape(B, L, -1))
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_every_temperature_parameter_gets_a_gradient():
    layer = _layer()
    layer(torch.randn(2, 6, 32, dtype=torch.float64)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="d_model: expected a multiple of n_heads"):
        SelectiveSelfAttention(30, 4)
    with pytest.raises(ValueError, match="n_kv_heads: expected a divisor"):
        SelectiveSelfAttention(32, 4, n_kv_heads=3)
    with pytest.raises(ValueError, match="gate: expected one of"):
        SelectiveSelfAttention(32, 4, gate="relu")
    with pytest.raises(ValueError, match="x: expected a 3-d tensor"):
        SelectiveSelfAttention(32, 4)(torch.randn(32))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, L, d_model\) = \(B, L, 32\)"):
        SelectiveSelfAttention(32, 4)(torch.randn(1, 2, 24))
    with pytest.raises(TypeError, match="x: expected dtype float32 \\(the dtype of the layer's weights\\)"):
        SelectiveSelfAttention(32, 4)(torch.randn(1, 2, 32, dtype=torch.float64))


@pytest.mark.parametrize("B,L", [(0, 5), (2, 0), (0, 0)])
def test_layer_empty_batch_or_sequence(B, L):
    # a view(..., -1) of a zero-size tensor cannot infer the size: these once raised RuntimeError there
    layer = _layer()
    x = torch.randn(B, L, 32, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == (B, L, 32)
    out.sum().backward()
    assert x.grad.shape == x.shape
    cache = KVCache()
    with torch.no_grad():
        assert layer(x.detach(), cache).shape == (B, L, 32) and cache.length == L
        nxt = layer(torch.randn(B, 3, 32, dtype=torch.float64), cache)
    assert nxt.shape == (B, 3, 32) and cache.length == L + 3
    block = nn.Sequential(_NanoBlock()).double()
    convert_to_selective(block)
    assert block(x.detach()).shape == (B, L, 32)


# --------------------------------------------------------------------------- conversion


class _NanoAttention(nn.Module):
    """A nanoGPT CausalSelfAttention, written out (c_attn, c_proj, n_head; SDPA with is_causal)."""

    def __init__(self, C, n_head):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(C, 3 * C), nn.Linear(C, C), n_head

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, L, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, L, C))


class _NanoBlock(nn.Module):
    def __init__(self, C=32, n_head=4):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(C), _NanoAttention(C, n_head), nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def test_convert_nanogpt_block_keeps_its_outputs_and_learns_temperatures():
    torch.manual_seed(1)
    model = nn.Sequential(_NanoBlock(), _NanoBlock()).double().eval()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    want = model(x)
    convert_to_selective(model)
    assert sum(type(m).__name__ == "_NanoGPTSelective" for m in model.modules()) == 2
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-12)
    model(x).square().sum().backward()
    temps = [p for n, p in model.named_parameters() if n.endswith((".beta", ".u"))]
    assert len(temps) == 8 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in temps)


def test_convert_rejects_a_model_without_causal_attention():
    with pytest.raises(ValueError, match="found none"):
        convert_to_selective(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="embedding width 6 that its 4 heads do not divide"):
        convert_to_selective(nn.Sequential(_NanoAttention(6, 4)))


def _gpt2(seed=0):
    transformers = oracle("transformers")
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_converted_gpt2_logits_equal_the_original_at_step_0():
    model = _gpt2()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        convert_to_selective(model)
        got = model(ids).logits
    assert sum(type(m).__name__ == "_GPT2Selective" for m in model.modules()) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # it trains: one step changes the temperatures
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if n.endswith((".beta", ".u"))], lr=0.1)
    out = model(ids, labels=ids)
    out.loss.backward()
    opt.step()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith((".beta", ".u")))


def test_converted_gpt2_cached_generation_equals_the_full_forward():
    # expexp at beta 0: g = exp(-1), so a wrong n (the authors' decode bug) would show in the logits
    model = convert_to_selective(_gpt2(3), gate="expexp", beta_init=0.0)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "SelectiveTemperature" and m.u is not None:
                m.u.normal_(0, 0.3)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        logits = [out.logits]
        past = out.past_key_values
        for t in range(5, 12):
            out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-5, atol=1e-5)


def test_converted_gpt2_decode_computes_temperatures_of_its_own_tokens_only(monkeypatch):
    """A decode step's value temperatures are those of its new token: the cache holds tau_v v (HF's cache keeps
    only k and v), not a recomputation over every cached token each step (O(L d) a step)."""
    model = convert_to_selective(_gpt2(2), gate="expexp", beta_init=0.0)
    seen = []
    for m in model.modules():
        if type(m).__name__ == "SelectiveTemperature":
            orig = m.forward
            monkeypatch.setattr(m, "forward", lambda x, start, _f=orig: (seen.append(x.shape[2]), _f(x, start))[1])
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
        seen.clear()
        out = model(ids[:, :6], use_cache=True)
        assert set(seen) == {6}
        seen.clear()
        steps = [out.logits]
        for t in range(6, 9):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        assert set(seen) == {1}  # tau_q and tau_v of the new token, in each layer
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_converted_gpt2_generates_the_same_with_hf_static_cache():
    """HF's StaticCache hands the attention its whole buffer (max_cache_len keys, zeros past the tokens seen)
    and a mask over it: the causal mask at q_offset = the tokens seen hides the unused slots, so sampling
    gives the same tokens and the same scores as the growing DynamicCache, and the scores equal the full
    forward's logits."""
    model = convert_to_selective(_gpt2(6), gate="expexp", beta_init=0.0)
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "SelectiveTemperature" and m.u is not None:
                m.u.normal_(0, 0.3)
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=6, do_sample=True, top_k=0, output_scores=True, return_dict_in_generate=True)
    runs = []
    with torch.no_grad():
        for impl in (None, "static"):
            torch.manual_seed(1)
            runs.append(model.generate(ids, cache_implementation=impl, **kw))
        full = model(runs[0].sequences).logits[:, 6:-1]
    (dyn, static) = runs
    assert torch.equal(dyn.sequences, static.sequences)
    torch.testing.assert_close(torch.stack(static.scores, 1), torch.stack(dyn.scores, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.stack(dyn.scores, 1), full, rtol=1e-5, atol=1e-5)


def test_converted_gpt2_rejects_padding():
    model = convert_to_selective(_gpt2())
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=mask)


def test_reference_positions_in_decode_are_absolute_not_the_query_length():
    # the authors' decode bug: n = query length = 1 at every step; ours is n = position + 1
    x = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    beta = torch.tensor(0.0, dtype=torch.float64)
    t7 = embkern.selective_temperatures(x, 7, beta, gate="linear")
    t0 = embkern.selective_temperatures(x, 0, beta + 1.0, gate="linear")
    assert float(t7) == 1.0 and float(t0) == 1.0  # g = 0 -> 1; log(1) = 0 -> 1
    t7b = embkern.selective_temperatures(x, 7, beta + 1.0, gate="linear")
    assert float(t7b) == pytest.approx(1 + math.log(8))
    assert ref.position_gate(torch.tensor(2.0), "expexp") == pytest.approx(math.exp(-math.exp(2.0)))


def test_char_lm_on_real_text_trains_both_attentions_on_the_same_batches():
    from embkern.contrib import char_lm

    if char_lm.corpus_path() is None:
        oracle("gensim")  # skips (or fails under make test, which installs the data)
    res = char_lm.train_models(("vanilla", "ssa"), steps=4, batch=2, context=16, d=16, heads=2, layers=1,
                               max_chars=20_000, backends=(None, "reference"), progress=False)
    assert set(res["curves"]) == {"vanilla", "ssa[auto]", "ssa[reference]"}
    assert all(len(c) == 4 and all(math.isfinite(x) for x in c) for c in res["curves"].values())
    # same seed and batches: the two SSA runs agree to rounding
    assert res["max_abs_diff_between_backends"]["ssa"] < 1e-5
    assert res["curves"]["vanilla"] != res["curves"]["ssa[auto]"]
