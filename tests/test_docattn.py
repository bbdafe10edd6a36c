"""DOC_ATTENTION: attention restricted to the query's own document (segments start at BOS or a row's start).

The masked SDPA/reference path is checked against documents run one by one through plain causal attention;
the FlashAttention varlen path against a fake `flash_attn_varlen_func` that asserts the real calling
convention; the full model (with the BOS-masked SmearGate) against the property that nothing crosses a
document boundary, in the training forward, sliding-window eval and score-first TTT.
"""
import copy
import dataclasses
import math
import sys
import time
import types

import numpy as np
import pytest
import torch

from conftest import tg, tiny_config
import pipeline_helpers as ph

BOS = tg.BOS_ID
VOCAB = 64


def packed_row(lengths, vocab=VOCAB, seed=0, first_has_bos=True):
    """One row (list of ids) of documents with the given lengths, each starting with BOS; the first one
    without its BOS when first_has_bos is False (a row that starts mid-document)."""
    rng = np.random.default_rng(seed)
    row = []
    for i, n in enumerate(lengths):
        body = rng.integers(2, vocab, size=n - 1).tolist()
        row += body + [int(rng.integers(2, vocab))] if (i == 0 and not first_has_bos) else [BOS] + body
    return row


def segments(row):
    """[(start, end)] of the documents of one row, computed by a plain loop over the ids."""
    starts = [0] + [t for t in range(1, len(row)) if row[t] == BOS]
    return list(zip(starts, starts[1:] + [len(row)]))


def dense_causal(q, k, v):
    """Plain causal GQA attention with no mask argument, (T,H,D)/(T,Hkv,D) -> (T,H,D), by explicit loops."""
    T, H, D = q.shape
    group = H // k.size(1)
    out = torch.zeros_like(q)
    for h in range(H):
        for t in range(T):
            w = torch.softmax(k[:t + 1, h // group] @ q[t, h] / math.sqrt(D), dim=0)
            out[t, h] = w @ v[:t + 1, h // group]
    return out


def per_document(q, k, v, rows):
    """Each document of each row run separately through dense_causal, concatenated back: (B,T,H,D)."""
    return torch.stack([torch.cat([dense_causal(q[b, s:e], k[b, s:e], v[b, s:e]) for s, e in segments(row)])
                        for b, row in enumerate(rows)])


# ---------------------------------------------------------------------------------------------
# Document structure and the masked (SDPA / reference) path
# ---------------------------------------------------------------------------------------------


def test_document_structure_by_hand():
    ids = torch.tensor([[5, BOS, 7, 8, BOS, BOS, 3, 4],   # starts mid-document; a length-1 document at 4
                        [BOS, 9, 9, BOS, 2, 3, 4, 5]])
    torch.testing.assert_close(tg.document_index(ids, 8), torch.tensor([[0, 1, 1, 1, 2, 3, 3, 3],
                                                                        [0, 0, 0, 1, 1, 1, 1, 1]]))
    # capped at 2 documents per row: the third and later share the second
    torch.testing.assert_close(tg.document_index(ids, 2), torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1],
                                                                        [0, 0, 0, 1, 1, 1, 1, 1]]))
    cu = tg.document_structure(ids, "fa3", max_docs=4)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 1, 4, 5, 8, 11, 16, 16, 16]  # row 1's two unused slots repeat its end
    assert tg.document_structure(ids, "fa2").tolist() == [0, 1, 4, 5] + [8] * 5 + [11] + [16] * 7  # N = T
    mask = tg.document_structure(ids, "sdpa")
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    want = torch.zeros(2, 8, 8, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        for s, e in segments(row):
            want[b, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    assert torch.equal(mask[:, 0], want)
    assert mask[:, 0].diagonal(dim1=-2, dim2=-1).all()  # every query (BOS included) sees itself: no NaN rows


ROWS = [packed_row([3, 1, 5, 1, 6], seed=1, first_has_bos=False),  # mid-document start, two length-1 docs
        packed_row([4, 2, 1, 9], seed=2),
        packed_row([16], seed=3)]                                   # one document: plain causal


@pytest.mark.parametrize("fn", [tg.sdpa_attention, tg.reference_attention], ids=["sdpa", "reference"])
def test_masked_attention_matches_documents_run_separately(fn):
    """Values and q/k/v gradients of the packed masked attention equal per-document plain causal attention
    (GQA H=4, Hkv=2); without the mask they do not."""
    ids = torch.tensor(ROWS)
    B, T = ids.shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, n, 8, generator=gen, dtype=torch.float64, requires_grad=True) for n in (4, 2, 2))
    w = torch.randn(B, T, 4, 8, generator=gen, dtype=torch.float64)
    tol = dict(rtol=1e-10, atol=1e-10) if fn is tg.sdpa_attention else dict(rtol=0, atol=2e-6)  # ref: fp32 inside
    mask = tg.document_structure(ids, "sdpa")
    packed = fn(q, k, v, mask)
    ref = per_document(q, k, v, ROWS)
    torch.testing.assert_close(packed, ref, **tol)
    g_packed = torch.autograd.grad((packed * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g_packed, g_ref):
        torch.testing.assert_close(a, b, **tol)
    assert all(g.abs().max() > 1e-3 for g in g_packed)
    dense = fn(q, k, v)  # teeth: plain causal attention mixes documents of rows 0 and 1 ...
    assert (dense[:2] - ref[:2]).abs().max() > 1e-2
    torch.testing.assert_close(dense[2], ref[2], **tol)  # ... but not of the one-document row


# ---------------------------------------------------------------------------------------------
# The FlashAttention varlen path, through a fake that asserts the real calling convention
# ---------------------------------------------------------------------------------------------


class FakeVarlenFlash:
    """Stand-in for flash_attn_interface / flash_attn: flash_attn_varlen_func loops over the cu_seqlens
    segments with dense causal attention and asserts the calling convention; the dense flash_attn_func
    must not be called under DOC_ATTENTION."""

    def __init__(self, num_heads, num_kv_heads, returns_tuple, num_segments=None):
        self.num_heads, self.num_kv_heads, self.returns_tuple = num_heads, num_kv_heads, returns_tuple
        self.num_segments = num_segments  # expected len(cu_seqlens) - 1 (the padded, fixed length)
        self.calls, self.lengths = 0, set()

    def flash_attn_func(self, *args, **kwargs):
        raise AssertionError("DOC_ATTENTION must use flash_attn_varlen_func")

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=None, causal=False, **kwargs):
        assert causal is True, "varlen attention must be called with causal=True"
        assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "q/k/v must be flattened to (B*T, heads, D)"
        N, H, D = q.shape
        assert H == self.num_heads and k.shape == (N, self.num_kv_heads, D) and v.shape == k.shape
        assert q.dtype == k.dtype == v.dtype
        for cu in (cu_seqlens_q, cu_seqlens_k):
            assert isinstance(cu, torch.Tensor) and cu.dtype == torch.int32 and cu.dim() == 1
        assert torch.equal(cu_seqlens_q, cu_seqlens_k)
        cu = cu_seqlens_q.tolist()
        assert cu[0] == 0 and cu[-1] == N, f"offsets must run from 0 to B*T={N}, got {cu[0]}..{cu[-1]}"
        lens = np.diff(cu)
        assert (lens >= 0).all(), "offsets must be non-decreasing"
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        assert max_seqlen_q >= lens.max() and max_seqlen_k >= lens.max()
        assert softmax_scale is None or softmax_scale == pytest.approx(1 / math.sqrt(D))
        if self.num_segments is not None:
            assert len(cu) - 1 == self.num_segments, f"cu_seqlens must be padded to {self.num_segments + 1}"
        self.calls += 1
        self.lengths.add(len(cu))
        out = torch.cat([dense_causal(q[s:e].double(), k[s:e].double(), v[s:e].double())
                         for s, e in zip(cu[:-1], cu[1:]) if e > s]).to(q.dtype)
        if self.returns_tuple:
            return out, torch.zeros(H, N, dtype=torch.float32)
        return out

    def as_module(self, name):
        mod = types.ModuleType(name)
        mod.flash_attn_func = self.flash_attn_func
        mod.flash_attn_varlen_func = self.flash_attn_varlen_func
        return mod


def test_fake_varlen_catches_bad_calls():
    fake = FakeVarlenFlash(4, 2, returns_tuple=True)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, n, 8, generator=gen) for n in (4, 2, 2))
    cu = torch.tensor([0, 3, 4, 10, 10], dtype=torch.int32)
    out, _ = fake.flash_attn_varlen_func(q, k, v, cu, cu, 10, 10, causal=True)
    ref = torch.cat([tg.sdpa_attention(q[None, s:e], k[None, s:e], v[None, s:e])[0] for s, e in ((0, 3), (3, 4), (4, 10))])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    bad = [dict(cu_seqlens_q=cu.long(), cu_seqlens_k=cu.long()),                      # int64 offsets
           dict(causal=False),
           dict(cu_seqlens_q=cu[:-1].clone(), cu_seqlens_k=cu[:-1].clone()),          # ends at 10 but ...
           dict(cu_seqlens_q=torch.tensor([0, 3, 8], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 3, 8], dtype=torch.int32)),             # ... last != B*T
           dict(cu_seqlens_q=torch.tensor([0, 5, 3, 10], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 5, 3, 10], dtype=torch.int32)),         # decreasing
           dict(max_seqlen_q=4, max_seqlen_k=4)]                                      # below the longest
    for i, over in enumerate(bad):
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=10, max_seqlen_k=10, causal=True)
        kw.update(over)
        if i == 2:  # the trimmed cu still ends at 10: the padded-length check is what must fire
            fake.num_segments = 4
        with pytest.raises(AssertionError):
            fake.flash_attn_varlen_func(q, k, v, **kw)
        fake.num_segments = None
    with pytest.raises(AssertionError):  # the unflattened (B,T,H,D) layout
        fake.flash_attn_varlen_func(q[None], k[None], v[None], cu, cu, 10, 10, causal=True)
    with pytest.raises(AssertionError):
        fake.flash_attn_func(q[None], k[None], v[None], causal=True)


def doc_batch(lengths_per_row, seed):
    """(ids, targets) (B,T) of packed rows with the given document lengths."""
    ids = torch.tensor([packed_row(r, seed=seed + i, first_has_bos=i % 2 == 0) for i, r in enumerate(lengths_per_row)])
    return ids, torch.roll(ids, -1, 1)


@pytest.mark.parametrize("backend,module_name,returns_tuple",
                         [("fa3", "flash_attn_interface", True), ("fa2", "flash_attn", False)])
@pytest.mark.parametrize("max_docs", [0, 64, 2])
def test_varlen_backend_matches_masked_sdpa(monkeypatch, backend, module_name, returns_tuple, max_docs):
    """Loss and gradients with the (fake) varlen FlashAttention equal the masked SDPA path, for batches with
    different numbers of documents through one fixed cu_seqlens length; with DOC_ATTENTION_MAX_DOCS=2 both
    paths merge a row's third and later documents alike."""
    cfg = tiny_config(doc_attention=True, doc_attention_max_docs=max_docs, smear_gate=True, sparse_attn_gate=True)
    T = cfg.train_seq_len
    fake = FakeVarlenFlash(cfg.num_heads, cfg.num_kv_heads, returns_tuple, num_segments=2 * (max_docs or T))
    monkeypatch.setattr(tg, "_FLASH", {})
    monkeypatch.setitem(sys.modules, module_name, fake.as_module(module_name))
    assert tg.load_flash_backend(backend) is True
    assert tg.resolve_attention_backend(backend, torch.device("cpu")) == backend
    rt = tg.Runtime(device=torch.device("cpu"))
    ref = ph.perturbed_model(cfg, rt, seed=11)
    fa = tg.GPT(cfg, backend)
    fa.load_state_dict(ref.state_dict())
    plain = tg.GPT(dataclasses.replace(cfg, doc_attention=False), "sdpa")
    plain.load_state_dict(ref.state_dict())
    batches = [doc_batch([[3, 1, 5, 7], [16]], seed=1), doc_batch([[2, 2, 2, 1, 1, 8], [5, 11]], seed=2)]
    for (ids, tgt), looped in zip(batches, (False, True)):
        losses, grads = [], []
        for model in (ref, fa):
            model.zero_grad()
            loss = model(ids, tgt, looped)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5, msg=n)
        with torch.no_grad():  # teeth: these batches do mix documents under plain causal attention
            assert abs(plain(ids, tgt, looped).item() - losses[0].item()) > 1e-3
    n_layers = sum(len(part) for part in tg.layer_layout(cfg, False)) + sum(
        len(part) for part in tg.layer_layout(cfg, True))
    assert fake.calls == n_layers  # one varlen call per attention layer visit, never flash_attn_func
    assert fake.lengths == {2 * (max_docs or T) + 1}  # 7 and 9 documents: one static cu_seqlens length


def test_document_structure_is_built_once_per_forward(monkeypatch):
    cfg = tiny_config(doc_attention=True)
    model = tg.GPT(cfg, "sdpa")
    calls = []
    real = tg.document_structure
    monkeypatch.setattr(tg, "document_structure", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, tgt = doc_batch([[4, 12]], seed=0)
    with torch.no_grad():
        model(ids, tgt, True)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------
# The full model: nothing crosses a document boundary
# ---------------------------------------------------------------------------------------------

LENGTHS = [5, 1, 7, 6, 6]  # row starts mid-document (no BOS at 0); document 1 is a lone BOS; 24 ids + 1 target


def doc_model(doc_attention):
    """A perturbed tiny model (loops, XSA, parallel lanes, smear gate, attention gate) with DOC_ATTENTION."""
    cfg = tiny_config(doc_attention=doc_attention, smear_gate=True, sparse_attn_gate=True, parallel_lanes=True,
                      parallel_residual_start=3, parallel_final_lane="mean", train_seq_len=32)  # no NTK at T=24
    return cfg, ph.perturbed_model(cfg, tg.Runtime(device=torch.device("cpu")), seed=5)


def changed(tokens, j):
    """Copy of 1-D `tokens` with token j replaced by another non-BOS id."""
    out = tokens.clone()
    out[j] = 2 + (int(tokens[j]) - 2 + 17) % (VOCAB - 2)
    assert out[j] != tokens[j] and out[j] != BOS
    return out


@pytest.mark.parametrize("n", [0, 1, 2])
def test_training_forward_isolates_documents(n):
    """Per-token NLL of documents after N is unchanged by changing any token of document N (its last one
    included), plain and looped; with DOC_ATTENTION=0 the same change reaches document N+1. Document 1 is a
    lone BOS: there the last token of document 0 is changed and documents 1.. are checked."""
    row = torch.tensor(packed_row(LENGTHS, seed=7, first_has_bos=False))
    ids, tgt = row[:-1], row[1:]
    segs = segments(ids.tolist())
    assert [e - s for s, e in segs] == [5, 1, 7, 6, 5]
    (s, e), nxt = segs[n], segs[n + 1]
    positions = [j for j in range(s, e) if ids[j] != BOS]
    if not positions:
        positions, nxt = [s - 1], (s, e)
    for doc_attention in (True, False):
        _, model = doc_model(doc_attention)
        leaked = 0.0
        with torch.no_grad():
            for looped in (False, True):
                base = model.token_nll(ids[None], tgt[None], looped)[0]
                for j in positions:
                    x = changed(row, j)
                    nll = model.token_nll(x[None, :-1], x[None, 1:], looped)[0]
                    if doc_attention:
                        torch.testing.assert_close(nll[nxt[0]:], base[nxt[0]:], rtol=0, atol=1e-6)
                    leaked = max(leaked, (nll[nxt[0]:nxt[1]] - base[nxt[0]:nxt[1]]).abs().max().item())
                    assert (nll[j - 1] - base[j - 1]).abs() > 1e-4 or j == 0  # the changed token is scored
        assert (leaked > 1e-3) == (not doc_attention), (doc_attention, leaked)


def test_packed_document_scores_equal_the_document_alone():
    """With DOC_ATTENTION=1 a document's NLLs in a packed row equal those of the document as its own row:
    row positions under RoPE change nothing (relative offsets), nor does the preceding text."""
    row = torch.tensor(packed_row(LENGTHS, seed=7, first_has_bos=False))
    _, model = doc_model(True)
    s, e = segments(row[:-1].tolist())[2]
    with torch.no_grad():
        packed = model.token_nll(row[None, :-1], row[None, 1:], True)[0]
        alone = model.token_nll(row[None, s:e], row[None, s + 1:e + 1], True)[0]
    torch.testing.assert_close(packed[s:e], alone, rtol=1e-5, atol=1e-5)
    assert (packed[s:e] - model.token_nll(row[None, s - 3:e], row[None, s - 2:e + 1], True)[0, 3:]).abs().max() < 1e-5


def test_doc_attention_off_builds_no_structure_and_one_document_rows_match(monkeypatch):
    """DOC_ATTENTION=0 never builds a document structure (the attention calls are today's); on rows with no
    BOS after position 0, DOC_ATTENTION=1 computes the same function."""
    _, model_on = doc_model(True)
    _, model_off = doc_model(False)
    ids = torch.tensor([packed_row([16], seed=1), packed_row([16], seed=2, first_has_bos=False)])
    with torch.no_grad():
        on = model_on.token_nll(ids, torch.roll(ids, -1, 1), True)
        monkeypatch.setattr(tg, "document_structure", lambda *a, **k: pytest.fail("built with DOC_ATTENTION=0"))
        off = model_off.token_nll(ids, torch.roll(ids, -1, 1), True)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)


def val_stream(total, doc_span, seed=0):
    """total+1 val tokens: random documents of 9..15 tokens, and documents N, N+1 at doc_span[0]..[1]..[2]."""
    a, b, c = doc_span
    rng = np.random.default_rng(seed)
    toks = rng.integers(2, VOCAB, size=total + 1)
    bos = [0]
    while bos[-1] < total:
        bos.append(bos[-1] + int(rng.integers(9, 16)))
    toks[[p for p in bos if p <= total and not a - 2 < p < c + 2]] = BOS
    toks[[a, b, c]] = BOS
    return torch.from_numpy(toks.astype(np.int64))


def scores(kind, cfg, model, tokens, bc):
    """per_position NLLs (numpy, total) of eval_sliding or eval_ttt on a fresh copy of model."""
    rt = tg.Runtime(device=torch.device("cpu"))
    total = tokens.numel() - 1
    per = np.full(total, np.nan)
    model = copy.deepcopy(model)
    if kind == "sliding":
        tg.eval_sliding(cfg, rt, model.token_nll, tokens, bc, True, per_position=per)
    else:
        fns = tg.EvalFns(model, rt)
        _, _, info = tg.eval_ttt(cfg, rt, model, fns.loss_sum, fns.nll, tokens, bc, True, tg.LegalityLedger(total),
                                 lambda *a, **k: None, time.perf_counter(), per_position=per)
        assert info["sgd_steps"] > 0
    assert not np.isnan(per).any()
    return per


@pytest.mark.parametrize("kind", ["sliding", "ttt"])
def test_eval_scores_isolate_documents(kind):
    """Sliding-window and TTT per-position scores of document N+1 (both documents inside TTT chunk 1, so
    chunk 0's SGD has already moved the weights) are unchanged by changing any token of document N; with
    DOC_ATTENTION=0 they change."""
    a, b, c = 35, 44, 58  # document N = [35, 44), document N+1 = [44, 58); chunks of 32 tokens
    for doc_attention in (True, False):
        cfg, model = doc_model(doc_attention)
        cfg = dataclasses.replace(cfg, ttt_lr=0.2, ttt_epochs=2, eval_budget_seconds=1e9)
        assert cfg.ttt_chunk_tokens == 32 and cfg.eval_seq_len == 16 and cfg.eval_stride == 4
        bc = tg.ByteCounter(ph.random_byte_tables(VOCAB, seed=4), torch.device("cpu"))
        tokens = val_stream(96, (a, b, c), seed=3)
        base = scores(kind, cfg, model, tokens, bc)
        leaked = 0.0
        for j in (range(a + 1, b) if doc_attention else (a + 3, b - 1)):  # every token when isolated
            per = scores(kind, cfg, model, changed(tokens, j), bc)
            if doc_attention:
                np.testing.assert_allclose(per[b:c], base[b:c], rtol=0, atol=1e-6, err_msg=f"token {j}")
            leaked = max(leaked, np.abs(per[b:c] - base[b:c]).max())
            assert np.abs(per[a:b - 1] - base[a:b - 1]).max() > 1e-4  # document N itself does change
        assert (leaked > 1e-3) == (not doc_attention), (kind, doc_attention, leaked)


# ---------------------------------------------------------------------------------------------
# Config, runtime checks and torch.compile
# ---------------------------------------------------------------------------------------------


def test_config_switch_alone_on_any_preset():
    for preset in tg.PRESETS:
        assert tg.load_config({"PRESET": preset}).doc_attention is False
        on = tg.load_config({"PRESET": preset, "DOC_ATTENTION": "1"})
        off = tg.load_config({"PRESET": preset})
        assert on.doc_attention is True
        diff = {f.name for f in dataclasses.fields(on) if getattr(on, f.name) != getattr(off, f.name)}
        assert diff <= {"doc_attention", "run_id", "artifact_path"}, diff
    tg.validate_config(tiny_config(doc_attention=True, smear_gate=False), 1)  # needs nothing else
    with pytest.raises(tg.ConfigError, match="DOC_ATTENTION_MAX_DOCS"):
        tg.validate_config(tiny_config(doc_attention=True, doc_attention_max_docs=-1), 1)
    with pytest.raises(tg.ConfigError, match="DOC_ATTENTION"):
        tg.load_config({"DOC_ATENTION": "1"})  # typo


def test_flash_without_varlen_is_a_config_error(monkeypatch):
    flash_only = types.SimpleNamespace(flash_attn_func=lambda *a, **k: None)
    monkeypatch.setattr(tg, "_FLASH", {"fa3": flash_only})
    cfg = tiny_config(doc_attention=True, attention_backend="fa3", device="cpu", compile="0")
    with pytest.raises(tg.ConfigError, match="flash_attn_varlen_func"):
        tg.setup_runtime(cfg)
    assert tg.setup_runtime(dataclasses.replace(cfg, doc_attention=False)).attention_backend == "fa3"
    monkeypatch.setitem(tg._FLASH, "fa3", FakeVarlenFlash(4, 2, True).as_module("flash_attn_interface"))
    assert tg.setup_runtime(cfg).attention_backend == "fa3"


def traceable_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, **kw):
    """A varlen stand-in dynamo can trace: the segment mask rebuilt from cu_seqlens with tensor ops."""
    pos = torch.arange(q.size(0))
    seg = torch.searchsorted(cu_seqlens_q[1:], pos, right=True)
    mask = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    return tg.sdpa_attention(q[None], k[None], v[None], mask[None, None])[0]


def test_fullgraph_probe_covers_the_varlen_call(monkeypatch):
    rt = tg.Runtime(device=torch.device("cpu"), compile=True, attention_backend="fa3")

    def untraceable(*a, **k):
        torch._dynamo.graph_break()
        return traceable_varlen(*a, **k)

    mod = types.SimpleNamespace(flash_attn_func=lambda q, k, v, causal=False: tg.sdpa_attention(q, k, v),
                                flash_attn_varlen_func=untraceable)
    monkeypatch.setitem(tg._FLASH, "fa3", mod)
    assert tg.attention_traces_fullgraph(rt)  # the dense call traces ...
    assert not tg.attention_traces_fullgraph(rt, doc_attention=True)  # ... the varlen one does not
    mod.flash_attn_varlen_func = traceable_varlen
    assert tg.attention_traces_fullgraph(rt, doc_attention=True)


@pytest.mark.slow  # ~12 s with a warm inductor cache, ~60 s cold on this 2-core machine
def test_compiled_doc_attention_matches_eager():
    """Inductor (CPU) forward+backward of a small DOC_ATTENTION model equals eager; the FlashAttention
    structure builder compiles to one graph whose output shape does not depend on the document count."""
    torch._dynamo.reset()
    cfg = tiny_config(doc_attention=True, smear_gate=True, num_layers=2, xsa_last_n=1, parallel_residual_start=1,
                      num_loops=0, loop_start=0, loop_end=0)
    model = ph.perturbed_model(cfg, tg.Runtime(device=torch.device("cpu")), seed=2)
    ids, tgt = doc_batch([[3, 1, 5, 7], [16]], seed=1)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    results = []
    for fn in (compiled, model):
        model.zero_grad()
        loss = fn(ids, tgt)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    build = torch.compile(lambda x: tg.document_structure(x, "fa3", 8), dynamic=False, fullgraph=True)
    graphs = tg.compiled_graph_count()
    for lengths in ([[3, 1, 5, 7], [16]], [[2, 2, 2, 1, 1, 8], [5, 11]]):
        x, _ = doc_batch(lengths, seed=4)
        assert torch.equal(build(x), tg.document_structure(x, "fa3", 8))
    assert tg.compiled_graph_count() - graphs == 1
    torch._dynamo.reset()
