"""Model tests: parameter count, a hand-written block forward, recurrence/skip wiring, attention backends."""
import math
import sys
import types

import pytest
import torch

from conftest import tg, tiny_config

EPS32 = torch.finfo(torch.float32).eps



def perturb_(model, seed=0, std=0.3):
    """Add N(0, std) noise to every parameter under a fixed seed (zero projections become non-trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            p.add_(noise.to(p.dtype))
    return model


# ------------------------------------------------------------------------------------------------
# Parameter count and shapes of the record model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def record_model():
    """The PRESET=record GPT on CPU. Orthogonal init is stubbed out (it only fills values, the slow part)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.init, "orthogonal_", lambda w, *a, **k: w)
        return tg.GPT(tg.Hyperparameters())


def test_record_param_count(record_model):
    assert sum(p.numel() for p in record_model.parameters()) == 35_944_536


def test_record_param_shapes_follow_spec_table(record_model):
    """Every tensor of the record's model with its shape; nothing more, nothing less."""
    expected = {"tok_emb.weight": (8192, 512), "skip_weights": (8, 512), "skip_gates": (8, 512)}
    for i in range(11):
        b = f"blocks.{i}."
        expected.update({
            b + "attn.c_q.weight": (512, 512), b + "attn.c_k.weight": (256, 512), b + "attn.c_v.weight": (256, 512),
            b + "attn.proj.weight": (512, 512), b + "attn.q_gain": (8,), b + "mlp.fc.weight": (2048, 512),
            b + "mlp.proj.weight": (512, 2048), b + "attn_scale": (512,), b + "mlp_scale": (512,),
            b + "resid_mix": (2, 512),
        })
    got = {n: tuple(p.shape) for n, p in record_model.named_parameters()}
    assert got == expected
    assert record_model.num_skips == 8
    # init values that are not random
    blk = record_model.blocks[4]
    assert torch.all(blk.attn.q_gain == 5.25)
    assert torch.all(blk.attn.proj.weight == 0) and torch.all(blk.mlp.proj.weight == 0)
    assert torch.equal(blk.resid_mix[0], torch.ones(512)) and torch.equal(blk.resid_mix[1], torch.zeros(512))
    assert torch.all(record_model.skip_gates == 0) and torch.all(record_model.skip_weights == 1)
    assert [b.ln_s for b in record_model.blocks] == pytest.approx([1 / math.sqrt(i + 1) for i in range(11)])


# ------------------------------------------------------------------------------------------------
# Hand-written forward of one block
# ------------------------------------------------------------------------------------------------


def ref_rms(x):
    """RMS norm over the last dim with the fp32 machine epsilon (no weight)."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS32)


def ref_rope(x, rope_dims, base):
    """Rotate pairs (j, h+j), j < h = rope_dims/2, of x (B,T,H,D) by angle pos*base^(-2j/rope_dims)."""
    out = x.clone()
    T = x.size(1)
    h = rope_dims // 2
    for j in range(h):
        theta = base ** (-2.0 * j / rope_dims)
        ang = torch.arange(T, dtype=x.dtype) * theta
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
        a, b = x[..., j], x[..., h + j]
        out[..., j] = a * cos + b * sin
        out[..., h + j] = b * cos - a * sin
    return out


def ref_attention(q, k, v, xsa):
    """Causal GQA softmax attention with optional XSA, head by head with explicit loops (float64)."""
    B, T, H, D = q.shape
    hkv = k.size(2)
    group = H // hkv
    out = torch.zeros_like(q)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for b in range(B):
        for h in range(H):
            g = h // group
            scores = (q[b, :, h] @ k[b, :, g].T) / math.sqrt(D)
            probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
            y = probs @ v[b, :, g]
            if xsa:
                vhat = v[b, :, g] / v[b, :, g].norm(dim=-1, keepdim=True)
                y = y - (y * vhat).sum(-1, keepdim=True) * vhat
            out[b, :, h] = y
    return out


def ref_block(block, cfg, layer_idx, x, x0, xsa, parallel):
    """The record's block written out from its weights, in float64."""
    w = {n: p.detach().double() for n, p in block.named_parameters()}
    H, Hkv = cfg.num_heads, cfg.num_kv_heads
    hd = cfg.model_dim // H
    ln = 1.0 / math.sqrt(layer_idx + 1)

    def attn(h):
        B, T, _ = h.shape
        q = (h @ w["attn.c_q.weight"].T).view(B, T, H, hd)
        k = (h @ w["attn.c_k.weight"].T).view(B, T, Hkv, hd)
        v = (h @ w["attn.c_v.weight"].T).view(B, T, Hkv, hd)
        q = ref_rope(ref_rms(q), cfg.rope_dims, cfg.rope_base)
        k = ref_rope(ref_rms(k), cfg.rope_dims, cfg.rope_base)
        q = q * w["attn.q_gain"][None, None, :, None]
        y = ref_attention(q, k, v, xsa)
        return y.reshape(B, T, -1) @ w["attn.proj.weight"].T

    def mlp(h):
        u = h @ w["mlp.fc.weight"].T
        u = torch.where(u >= 0, u, 0.5 * u) ** 2
        return u @ w["mlp.proj.weight"].T

    x, x0 = x.double(), x0.double()
    x_in = w["resid_mix"][0] * x + w["resid_mix"][1] * x0
    a = attn(ref_rms(x_in) * ln)
    if parallel:
        return x_in + w["attn_scale"] * a + w["mlp_scale"] * mlp(ref_rms(x_in) * ln)
    x1 = x_in + w["attn_scale"] * a
    return x1 + w["mlp_scale"] * mlp(ref_rms(x1) * ln)


def run_block(block, cfg, x, x0):
    cos, sin = tg.rope_tables(x.size(1), cfg.rope_dims, cfg.rope_base, cfg.train_seq_len, x.device)
    with torch.no_grad():
        return block(x, x0, cos, sin)


# (layer index, XSA_LAST_N, ROPE_DIMS, (MODEL_DIM, NUM_HEADS, NUM_KV_HEADS)), NUM_LAYERS=5, PARALLEL_RESIDUAL_START=3
BLOCK_CASES = [
    (1, 3, 4, (32, 4, 2)),  # sequential, no XSA
    (2, 3, 4, (32, 4, 2)),  # sequential, XSA
    (3, 3, 4, (32, 4, 2)),  # parallel, XSA
    (4, 0, 4, (32, 4, 2)),  # parallel, no XSA
    (0, 5, 8, (32, 4, 2)),  # sequential, XSA, RoPE on the full head dim
    (3, 0, 2, (32, 4, 2)),  # parallel, no XSA, a single rotary pair
    (2, 3, 4, (48, 6, 2)),  # sequential, XSA, 3 query heads per KV head
    (4, 2, 6, (48, 6, 3)),  # parallel, XSA, 2 query heads per KV head, 3 KV heads
]


@pytest.mark.parametrize("layer_idx,xsa_last_n,rope_dims,heads", BLOCK_CASES)
def test_block_forward_matches_hand_computation(layer_idx, xsa_last_n, rope_dims, heads):
    dim, h, hkv = heads
    cfg = tiny_config(xsa_last_n=xsa_last_n, rope_dims=rope_dims, rope_base=100.0, model_dim=dim, num_heads=h,
                      num_kv_heads=hkv)
    expect_parallel = layer_idx >= cfg.parallel_residual_start
    expect_xsa = layer_idx >= cfg.num_layers - xsa_last_n
    torch.manual_seed(layer_idx)
    block = perturb_(tg.Block(cfg, layer_idx, "sdpa"), seed=layer_idx)
    assert block.parallel == expect_parallel and block.attn.use_xsa == expect_xsa
    gen = torch.Generator().manual_seed(100 + layer_idx)
    x = torch.randn(2, 11, cfg.model_dim, generator=gen)
    x0 = torch.randn(2, 11, cfg.model_dim, generator=gen)
    got = run_block(block, cfg, x, x0)
    want = ref_block(block, cfg, layer_idx, x, x0, expect_xsa, expect_parallel)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)
    # the reference has teeth: toggling either feature changes the expected output noticeably
    other = ref_block(block, cfg, layer_idx, x, x0, not expect_xsa, expect_parallel)
    assert (other - want).abs().max() > 1e-2
    other = ref_block(block, cfg, layer_idx, x, x0, expect_xsa, not expect_parallel)
    assert (other - want).abs().max() > 1e-2


def test_block_forward_reference_attention_backend_agrees():
    """The same block with backend 'reference' gives the same output as with 'sdpa'."""
    cfg = tiny_config()
    block = perturb_(tg.Block(cfg, 3, "sdpa"), seed=5)
    x = torch.randn(1, 9, cfg.model_dim, generator=torch.Generator().manual_seed(1))
    a = run_block(block, cfg, x, x * 0.5)
    block.attn.backend = "reference"
    b = run_block(block, cfg, x, x * 0.5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_partial_rope_only_touches_rope_dims():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 3, 16, generator=gen)
    cos, sin = tg.rope_tables(10, 6, 10000.0, 2048, torch.device("cpu"))
    assert cos.shape == (10, 3)
    y = tg.apply_partial_rope(x, cos, sin)
    assert torch.equal(y[..., 6:], x[..., 6:])  # pass-through dims bit-identical
    assert torch.equal(y[:, 0], x[:, 0])  # position 0 is the identity
    assert (y[:, 1:, :, :6] - x[:, 1:, :, :6]).abs().max() > 1e-2
    # each rotated pair (j, 3+j) keeps its 2-norm
    for j in range(3):
        torch.testing.assert_close(y[..., j] ** 2 + y[..., 3 + j] ** 2, x[..., j] ** 2 + x[..., 3 + j] ** 2)
    torch.testing.assert_close(y.double(), ref_rope(x.double(), 6, 10000.0), rtol=1e-5, atol=1e-5)
    # relative-position property: <rope(q)_t, rope(k)_s> depends on t-s only
    q = torch.randn(1, 1, 1, 16, generator=gen).expand(1, 10, 1, 16)
    k = torch.randn(1, 1, 1, 16, generator=gen).expand(1, 10, 1, 16)
    rq, rk = tg.apply_partial_rope(q, cos, sin), tg.apply_partial_rope(k, cos, sin)
    dots = (rq[0, :, 0] @ rk[0, :, 0].T)
    torch.testing.assert_close(dots.diagonal(-2), torch.full((8,), dots[2, 0].item()), rtol=1e-5, atol=1e-5)


def test_rope_tables_and_ntk_rescaling():
    cpu = torch.device("cpu")
    cos, sin = tg.rope_tables(12, 8, 10000.0, 16, cpu)
    j = torch.arange(4, dtype=torch.float64)
    ang = torch.arange(12, dtype=torch.float64)[:, None] * 10000.0 ** (-2 * j / 8)
    torch.testing.assert_close(cos.double(), ang.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.double(), ang.sin(), rtol=0, atol=1e-5)
    # eval longer than training: base * (L/train_len)^(d/(d-2)); the first 16 rows change
    cos2, sin2 = tg.rope_tables(32, 8, 10000.0, 16, cpu)
    base = 10000.0 * 2.0 ** (8 / 6)
    ang = torch.arange(32, dtype=torch.float64)[:, None] * base ** (-2 * j / 8)
    torch.testing.assert_close(cos2.double(), ang.cos(), rtol=0, atol=1e-5)
    assert (sin2[:12] - sin).abs().max() > 1e-3


def test_rope_tables_two_rope_dims_longer_than_training():
    cos, sin = tg.rope_tables(32, 2, 10000.0, 16, torch.device("cpu"))
    assert cos.shape == (32, 1) and torch.isfinite(cos).all() and torch.isfinite(sin).all()


def test_rope_dims_change_block_output():
    cfg4, cfg8 = tiny_config(rope_dims=4), tiny_config(rope_dims=8)
    b4 = perturb_(tg.Block(cfg4, 1, "sdpa"), seed=3)
    b8 = tg.Block(cfg8, 1, "sdpa")
    b8.load_state_dict(b4.state_dict())
    x = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(2))
    y4, y8 = run_block(b4, cfg4, x, x), run_block(b8, cfg8, x, x)
    assert (y4 - y8).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Depth recurrence layout and U-Net skip pairing
# ------------------------------------------------------------------------------------------------


def test_record_layer_layout():
    cfg = tg.Hyperparameters()
    assert tg.layer_layout(cfg, True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert tg.layer_layout(cfg, False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    cfg0 = tg.Hyperparameters(num_loops=0)
    assert tg.layer_layout(cfg0, True) == tg.layer_layout(cfg0, False)


def record_shaped_tiny_config(**kw):
    """The record's 11-layer wiring (loops 3..5 x3, parallel from 7, XSA everywhere) at toy width."""
    base = dict(num_layers=11, model_dim=16, num_heads=2, num_kv_heads=1, rope_dims=4, xsa_last_n=11,
                parallel_residual_start=7, loop_start=3, loop_end=5, num_loops=2)
    base.update(kw)
    return tiny_config(**base)


def trace_blocks(model, ids, looped):
    """Run the model and return [(physical layer, block input x, block output)] in call order."""
    calls, hooks = [], []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_hook(
            lambda mod, args, out, i=i: calls.append((i, args[0].detach().clone(), out.detach().clone()))))
    try:
        with torch.no_grad():
            model.logits(ids, looped)
    finally:
        for h in hooks:
            h.remove()
    return calls


@pytest.mark.parametrize("looped", [False, True])
def test_skip_pairing_is_lifo_and_last_decoder_layer_gets_none(looped):
    cfg = record_shaped_tiny_config()
    torch.manual_seed(0)
    model = perturb_(tg.GPT(cfg), seed=1)
    assert model.num_skips == 8
    with torch.no_grad():
        model.skip_gates.fill_(-1e4)  # sigmoid == 0: decoder input = skip_weights[k] * popped encoder output
        model.skip_weights.copy_(torch.rand(8, 16, generator=torch.Generator().manual_seed(2)) + 0.5)
    enc, dec = tg.layer_layout(cfg, looped)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    calls = trace_blocks(model, ids, looped)
    assert [c[0] for c in calls] == enc + dec
    enc_out = [out for _, _, out in calls[:len(enc)]]
    used = []
    for k in range(len(dec)):
        _, x_in, _ = calls[len(enc) + k]
        prev_out = calls[len(enc) + k - 1][2]
        if k < len(enc):
            matches = [j for j, o in enumerate(enc_out)
                       if torch.allclose(x_in, model.skip_weights[k].detach() * o, rtol=1e-6, atol=1e-6)]
            assert matches == [len(enc) - 1 - k], f"decoder step {k} got encoder outputs {matches}"
            used.append(matches[0])
        else:
            assert torch.equal(x_in, prev_out), "last decoder layer must receive the plain stream"
    assert sorted(used) == list(range(len(enc)))  # every encoder output consumed exactly once
    assert len(dec) == len(enc) + 1


def test_skip_gate_lerp_formula():
    """With arbitrary gates g: decoder input = sigmoid(g)*x + (1-sigmoid(g))*w*s; without gates x + w*s."""
    for gates in (True, False):
        cfg = record_shaped_tiny_config(skip_gates_enabled=gates)
        model = perturb_(tg.GPT(cfg), seed=4)
        assert (model.skip_gates is not None) == gates
        ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(5))
        enc, dec = tg.layer_layout(cfg, True)
        calls = trace_blocks(model, ids, True)
        for k in range(len(enc)):
            x_in = calls[len(enc) + k][1]
            prev = calls[len(enc) + k - 1][2]
            s = model.skip_weights[k].detach() * calls[len(enc) - 1 - k][2]
            if gates:
                g = torch.sigmoid(model.skip_gates[k].detach())
                want = g * prev + (1 - g) * s
            else:
                want = prev + s
            torch.testing.assert_close(x_in, want, rtol=1e-5, atol=1e-6)


def test_looped_and_plain_differ_and_logits_are_softcapped():
    cfg = tiny_config(logit_softcap=3.0)
    model = perturb_(tg.GPT(cfg), seed=7)
    with torch.no_grad():
        model.tok_emb.weight.mul_(20)  # large raw logits so the cap is active
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        plain, looped = model.logits(ids, False), model.logits(ids, True)
        raw = model.hidden(ids, True) @ model.tok_emb.weight.T
    assert (plain - looped).abs().max() > 1e-2
    assert looped.abs().max() <= 3.0 and plain.abs().max() <= 3.0
    assert raw.abs().max() > 3.0 and looped.abs().max() > 2.9
    torch.testing.assert_close(looped, 3.0 * torch.tanh(raw / 3.0), rtol=1e-5, atol=1e-5)
    # forward = mean CE, token_nll = -log softmax at the target
    tgt = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        nll = model.token_nll(ids, tgt, True)
        loss = model(ids, tgt, True)
    want = -torch.log_softmax(looped.double(), -1).gather(-1, tgt[..., None])[..., 0]
    torch.testing.assert_close(nll.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), want.mean(), rtol=1e-5, atol=1e-5)


def test_fresh_model_blocks_are_identity_on_the_stream():
    """At init (zero out-projections, resid_mix=(1,0)) every block returns its input unchanged."""
    cfg = tiny_config()
    model = tg.GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    for _, x_in, out in trace_blocks(model, ids, True):
        assert torch.equal(x_in, out)


# ------------------------------------------------------------------------------------------------
# Attention backends
# ------------------------------------------------------------------------------------------------


def naive_causal_gqa(q, k, v):
    """Explicit-loop causal GQA attention for (B,T,H,D) inputs, float64 result."""
    return ref_attention(q.double(), k.double(), v.double(), xsa=False)


def test_sdpa_and_reference_attention_agree_with_gqa():
    gen = torch.Generator().manual_seed(0)
    B, T, H, Hkv, D = 2, 13, 8, 4, 16
    q, k, v = (torch.randn(B, T, n, D, generator=gen) for n in (H, Hkv, Hkv))
    s, r = tg.sdpa_attention(q, k, v), tg.reference_attention(q, k, v)
    assert s.shape == (B, T, H, D) and r.shape == (B, T, H, D)
    torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.double(), naive_causal_gqa(q, k, v), rtol=1e-5, atol=1e-5)
    # GQA wiring is h -> h // (H/Hkv); the other plausible map h -> h % Hkv gives a different result
    wrong = naive_causal_gqa(q, k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1))
    assert (wrong - s.double()).abs().max() > 1e-2
    # causality: changing positions > t leaves outputs <= t unchanged
    t = 6
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for z in (q2, k2, v2):
        z[:, t + 1:] = torch.randn(z[:, t + 1:].shape, generator=gen)
    for fn in (tg.sdpa_attention, tg.reference_attention):
        a, b = fn(q, k, v), fn(q2, k2, v2)
        torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-6)
        assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-2


class FakeFlash:
    """Stand-in for flash_attn_interface / flash_attn that asserts the layout contract of the real API."""

    def __init__(self, num_heads, num_kv_heads, returns_tuple):
        self.num_heads, self.num_kv_heads, self.returns_tuple = num_heads, num_kv_heads, returns_tuple
        self.calls = 0

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, **kwargs):
        assert causal is True, "flash attention must be called with causal=True"
        assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4
        B, T, H, D = q.shape
        assert H == self.num_heads, f"q must be (B,T,H,D) with H={self.num_heads}, got {tuple(q.shape)}"
        assert k.shape == (B, T, self.num_kv_heads, D), f"k must be (B,T,Hkv,D), got {tuple(k.shape)}"
        assert v.shape == k.shape
        assert q.dtype == k.dtype == v.dtype
        assert softmax_scale is None or softmax_scale == pytest.approx(1 / math.sqrt(D))
        self.calls += 1
        out = naive_causal_gqa(q, k, v).to(q.dtype)
        if self.returns_tuple:
            lse = torch.zeros(B, H, T, dtype=torch.float32)
            return out, lse
        return out

    def as_module(self, name):
        mod = types.ModuleType(name)
        mod.flash_attn_func = self.flash_attn_func
        return mod


def test_fake_flash_catches_transposed_layout():
    fake = FakeFlash(4, 2, returns_tuple=True)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, n, 8, generator=gen) for n in (4, 2, 2))
    out, _ = fake.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(out, tg.sdpa_attention(q, k, v), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        fake.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    with pytest.raises(AssertionError):
        fake.flash_attn_func(q, k, v)  # causal defaults to False
    with pytest.raises(AssertionError):
        fake.flash_attn_func(q, k.half(), v.half(), causal=True)


@pytest.mark.parametrize("backend,module_name,returns_tuple",
                         [("fa3", "flash_attn_interface", True), ("fa2", "flash_attn", False)])
def test_flash_backend_loss_matches_sdpa(monkeypatch, backend, module_name, returns_tuple):
    cfg = tiny_config()
    fake = FakeFlash(cfg.num_heads, cfg.num_kv_heads, returns_tuple)
    monkeypatch.setattr(tg, "_FLASH", {})
    monkeypatch.setitem(sys.modules, module_name, fake.as_module(module_name))
    assert tg.load_flash_backend(backend) is True
    assert tg._FLASH[backend].flash_attn_func == fake.flash_attn_func
    assert tg.resolve_attention_backend(backend, torch.device("cpu")) == backend
    ref = perturb_(tg.GPT(cfg, "sdpa"), seed=11)
    fa = tg.GPT(cfg, backend)
    fa.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    tgt = torch.roll(ids, -1, 1)
    with torch.no_grad():
        for looped in (False, True):
            before = fake.calls
            a, b = ref(ids, tgt, looped), fa(ids, tgt, looped)
            n_layers = sum(len(part) for part in tg.layer_layout(cfg, looped))
            assert fake.calls - before == n_layers
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_load_flash_backend_rejects_missing_or_incomplete_modules(monkeypatch):
    monkeypatch.setattr(tg, "_FLASH", {})
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # import raises ImportError
    assert tg.load_flash_backend("fa3") is False
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # no flash_attn_func
    assert tg.load_flash_backend("fa2") is False
    assert tg._FLASH == {}


def test_flash_wheel_whose_library_fails_to_load_counts_as_missing(monkeypatch, tmp_path):
    """A broken FA3 wheel raises OSError at import (undefined symbol, CUDA ABI mismatch): treated as absent."""
    (tmp_path / "flash_attn_interface.py").write_text(
        "raise OSError('libflash_attn_3.so: undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
    monkeypatch.setattr(tg, "_FLASH", {})
    assert tg.load_flash_backend("fa3") is False
    with pytest.raises(tg.ConfigError, match="not importable"):
        tg.resolve_attention_backend("fa3", torch.device("cuda"))  # explicit request: a clear error


def test_flash_attention_is_chosen_on_cuda_only_in_half_precision(monkeypatch):
    """On a (simulated) Hopper GPU with FA3 importable: auto picks fa3 in bf16, sdpa in fp32 (FlashAttention
    takes bf16/fp16 only), and an explicit fa3 in fp32 is a ConfigError naming COMPUTE_DTYPE."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(tg, "_FLASH", {})
    monkeypatch.setitem(sys.modules, "flash_attn_interface", FakeFlash(4, 2, True).as_module("flash_attn_interface"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert tg.resolve_attention_backend("auto", cuda) == "fa3"
    assert tg.resolve_attention_backend("auto", cuda, half_precision=False) == "sdpa"
    with pytest.raises(tg.ConfigError, match="COMPUTE_DTYPE=fp32"):
        tg.resolve_attention_backend("fa3", cuda, half_precision=False)


def test_resolve_attention_backend_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(tg, "_FLASH", {})
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert tg.resolve_attention_backend("auto", cpu) == "sdpa"
    assert tg.resolve_attention_backend("sdpa", cpu) == "sdpa"
    assert tg.resolve_attention_backend("reference", cpu) == "reference"
    for name in ("fa3", "fa2"):
        with pytest.raises(tg.ConfigError, match=f"ATTENTION_BACKEND={name}"):
            tg.resolve_attention_backend(name, cpu)
    # even with a (fake) FA3 importable or already loaded, 'auto' on CPU stays on SDPA, and an explicit
    # request for a module that is importable but not injected still needs CUDA
    fake = FakeFlash(4, 2, True).as_module("flash_attn_interface")
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake)
    assert tg.resolve_attention_backend("auto", cpu) == "sdpa"
    with pytest.raises(tg.ConfigError, match="CUDA"):
        tg.resolve_attention_backend("fa3", cpu)
    tg._FLASH["fa3"] = fake
    assert tg.resolve_attention_backend("auto", cpu) == "sdpa"
    assert tg.resolve_attention_backend("fa3", cpu) == "fa3"


def test_bf16_compute_policy_runs_on_cpu_and_tracks_fp32():
    """COMPUTE_DTYPE=bf16 (the CUDA policy) runs here under CPU autocast: bf16 embedding, bf16 residual stream
    (block outputs and skips), and a training loss within 3% of the fp32 run at every one of 8 steps."""
    cfg = tiny_config(compute_dtype="bf16", grad_accum_base=1, train_batch_tokens=64)
    rt16 = tg.setup_runtime(cfg)
    assert rt16.compute_dtype == rt16.embed_dtype == rt16.ns_dtype == torch.bfloat16
    rt32 = tg.setup_runtime(tiny_config(grad_accum_base=1, train_batch_tokens=64))
    assert rt32.compute_dtype == torch.float32
    period = torch.arange(cfg.train_seq_len + 1) % 7 + 3  # a learnable periodic sequence
    x, y = period[:-1].repeat(4, 1), period[1:].repeat(4, 1)
    losses = {}
    for name, rt in (("fp32", rt32), ("bf16", rt16)):
        model = tg.build_model(cfg, rt)
        seen = []
        hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for b in model.blocks]
        trainer = tg.Trainer(cfg, rt, model)
        losses[name] = [trainer.step([(x, y)], s, 1.0, s >= 4).item() * cfg.grad_accum_base for s in range(8)]
        for h in hooks:
            h.remove()
        assert set(seen) == {rt.compute_dtype}, (name, set(seen))
        assert model.tok_emb.weight.dtype == rt.embed_dtype
    assert losses["fp32"][-1] < 0.8 * losses["fp32"][0]  # it learned, so agreement is not trivial
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) <= 0.03 * a, (losses["fp32"], losses["bf16"])


def test_flops_per_token_hand_count_tiny_and_record():
    """Training FLOPs/token against hand counts: a tiny config written out by hand, and the record's
    284.7 M (11 layers) / 426.3 M (17 looped virtual layers) counted by hand from its shapes."""
    cfg = tiny_config()  # D=32, 4 heads of 8, 2 KV heads, MLP 128, vocab 64, T=16, loop 1-2 once
    per_layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 2 * (32 * 128)  # q, k+v, out, fc+proj = 11264
    head, attn = 64 * 32, 2 * 2 * 4 * 8 * 16 / 2
    model = tg.GPT(cfg)
    for looped, visits in ((False, 5), (True, 7)):
        got = tg.flops_per_token(model, looped, 16)
        assert got["matmul"] == 3 * 2 * (visits * per_layer + head)
        assert got["attention"] == 3 * visits * attn
        assert got["total"] == got["matmul"] + got["attention"]
    record = tg.GPT(tg.Hyperparameters())
    assert abs(tg.flops_per_token(record, False, 2048)["total"] / 1e6 - 284.7) < 0.1
    assert abs(tg.flops_per_token(record, True, 2048)["total"] / 1e6 - 426.3) < 0.1
