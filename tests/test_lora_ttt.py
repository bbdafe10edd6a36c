"""Tests of TTT_MODE=lora_phased (EVALUATION section): per-document LoRA adapters scored chunk by chunk before
they train, reset per document, phased global SGD on fully scored documents only, the ledger's adapter
records, the LoRA math of the model hook, the budget guard, run_evaluation's dispatch and 2 ranks == 1 rank."""
import copy
import dataclasses
import math
import re
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, rank_results, run_script, tg, tiny_config
import pipeline_helpers as ph

VOCAB = 64
# Ten documents (positions each); 40 and 30 are longer than EVAL_SEQ_LEN=16. Phases: docs 0-2 | 3-5 | 6-9.
DOC_LENGTHS = [13, 9, 40, 7, 21, 15, 30, 11, 18, 12]
L, C = 16, 4


def quiet(*args, **kwargs):
    """A log function that drops lines."""


class Recorder(list):
    """A log function that keeps lines."""

    def __call__(self, line, console=True):
        self.append(line)


def lora_cfg(**kw):
    """Tiny LoRA TTT config: rank 4, chunks of 4, 3 documents per batch, phases after documents 3 and 6."""
    base = dict(ttt_mode="lora_phased", lora_rank=4, lora_chunk_tokens=C, lora_batch_docs=3, ttt_phase_docs="3,6",
                lora_lr=0.05, lora_wd=0.5, ttt_global_lr=0.05, ttt_global_chunk_tokens=32, eval_budget_seconds=1e9)
    base.update(kw)
    cfg = tiny_config(**base)
    assert cfg.eval_seq_len == L
    tg.validate_config(cfg, 1)
    return cfg


def doc_tokens(lengths, seed=5):
    """sum(lengths)+1 token ids: a BOS at the start of each document (and as the final target), random ids else."""
    rng = np.random.default_rng(seed)
    total = sum(lengths)
    toks = rng.integers(2, VOCAB, size=total + 1)
    toks[np.concatenate([[0], np.cumsum(lengths)])] = tg.BOS_ID
    return torch.from_numpy(toks.astype(np.int64))


@pytest.fixture(scope="module")
def setup():
    """(runtime, model, byte tables, ByteCounter, tokens, doc starts) shared by the module."""
    rt = tg.Runtime(device=torch.device("cpu"))
    model = ph.perturbed_model(lora_cfg(), rt, seed=3)
    tables = ph.random_byte_tables(VOCAB, seed=4)
    starts = np.concatenate([[0], np.cumsum(DOC_LENGTHS)[:-1]])
    return rt, model, tables, tg.ByteCounter(tables, rt.device), doc_tokens(DOC_LENGTHS), starts


def run_lora(cfg, rt, base_model, tokens, bc, log=quiet):
    """eval_ttt_lora_phased on a fresh copy of base_model: (loss, bpb, info, per_position, ledger, model)."""
    model = copy.deepcopy(base_model)
    total = tokens.numel() - 1
    per, ledger = np.full(total, np.nan), tg.LegalityLedger(total)
    loss, bpb, info = tg.eval_ttt_lora_phased(cfg, rt, model, model.token_nll, model.token_nll, tokens, bc, True,
                                              ledger, log, time.perf_counter(), per_position=per)
    return loss, bpb, info, per, ledger, model


@pytest.fixture(scope="module")
def baseline(setup):
    """The legal run on the shared tokens, with its log."""
    rt, model, _, bc, tokens, _ = setup
    log = Recorder()
    return run_lora(lora_cfg(), rt, model, tokens, bc, log=log) + (log,)


def perturb_token(tokens, j):
    """A copy of tokens with token j (not a BOS) replaced by a different non-BOS id."""
    assert tokens[j] != tg.BOS_ID
    out = tokens.clone()
    new = (int(tokens[j]) + 7) % VOCAB
    out[j] = 5 if new in (0, tg.BOS_ID) else new
    assert out[j] != tokens[j]
    return out


# ---------------------------------------------------------------------------------------------
# Documents, phases, batches
# ---------------------------------------------------------------------------------------------


def test_documents_phases_and_rank_batches():
    toks = doc_tokens([3, 5, 2]).numpy()[:10]
    starts, ends = tg.split_documents(toks)
    assert starts.tolist() == [0, 3, 8] and ends.tolist() == [3, 8, 10]
    no_bos_start = toks.copy()
    no_bos_start[0] = 7  # positions before the first BOS form document 0
    assert tg.split_documents(no_bos_start)[0].tolist() == [0, 3, 8]
    assert tg.plan_phases(10, "3,6") == [0, 3, 6, 10]
    assert tg.plan_phases(5, "3,6,9") == [0, 3, 5] and tg.plan_phases(3, "3") == [0, 3] and tg.plan_phases(4, "") == [0, 4]
    lengths = np.array([5, 9, 9, 1, 7, 3, 8])
    one = tg.Runtime(device=torch.device("cpu"))
    b1 = tg.rank_batches(np.arange(7), lengths, 2, one)
    assert [b.tolist() for b in b1] == [[1, 2], [6, 4], [0, 5], [3]]  # longest first, ties by id
    r0, r1 = (tg.rank_batches(np.arange(7), lengths, 2, dataclasses.replace(one, rank=r, world_size=2))
              for r in (0, 1))
    assert [b.tolist() for b in r0] == [[1, 6], [0, 3]] and [b.tolist() for b in r1] == [[2, 4], [5]]
    r1_short = tg.rank_batches(np.arange(5), lengths, 2, dataclasses.replace(one, rank=1, world_size=2))
    assert len(r1_short) == 2 and r1_short[1].size == 0  # same batch count as rank 0 (3 docs -> 2 batches)
    assert tg.lora_window_buckets(48, 2048) == [48, 96, 192, 384, 768, 1536, 2048]
    assert tg.lora_window_buckets(4, 16) == [4, 8, 16]
    assert tg.lora_window(0, 4, 16, [4, 8, 16]) == (0, 4, 4)
    assert tg.lora_window(2, 4, 16, [4, 8, 16]) == (0, 12, 16)
    assert tg.lora_window(6, 4, 16, [4, 8, 16]) == (12, 28, 16)
    assert tg.global_chunks(np.array([0, 10, 20, 30]), 40, 15) == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert tg.global_chunks(np.array([0, 50]), 60, 15) == [(0, 50), (50, 60)]  # a long document is one chunk
    assert tg.global_chunks(np.array([0, 10, 20, 30]), 30, 25) == [(0, 20), (20, 30)]


# ---------------------------------------------------------------------------------------------
# The legal run: exactly once, sums, ledger, phases
# ---------------------------------------------------------------------------------------------


def test_lora_ttt_scores_every_position_once_and_returns_their_sums(setup, baseline):
    rt, model, tables, bc, tokens, starts = setup
    loss, bpb, info, per, led, trained, log = baseline
    total = tokens.numel() - 1
    assert not np.isnan(per).any()
    res = led.verify(rt)
    assert res["scored_exactly_once"] and res["score_before_update"] and res["scored_tokens"] == total
    assert res["global_score_before_update"] and res["adapter_score_before_update"] and res["adapter_within_document"]
    # One adapter step per chunk that has a later chunk in its document; counted independently here.
    expected_steps = sum(-(-n // C) - 1 for n in DOC_LENGTHS)
    assert info["lora_doc_steps"] == expected_steps == res["adapter_steps"]
    assert info["docs"] == 10 and info["phases"] == 3 and info["adapted_docs"] == 10 and not info["budget_stopped"]
    # Global passes: after phase 1 over documents 0-2, after phase 2 over documents 0-5, never into a later one.
    ends = starts + np.array(DOC_LENGTHS)
    p1, p2 = ends[2], ends[5]
    n1, n2 = len(tg.global_chunks(starts, p1, 32)), len(tg.global_chunks(starts, p2, 32))
    assert info["global_steps"] == n1 + n2 == res["updates"]
    assert [v for v, _ in led.updates] == list(range(1, n1 + n2 + 1))
    assert max(m for v, m in led.updates if v <= n1) == p1 - 1 and max(m for _, m in led.updates) == p2 - 1
    scores = np.concatenate(led.scores)
    for lo, hi, ver, d, step in scores:  # spans: inside their document, one chunk, right base version
        assert starts[d] <= lo < hi <= ends[d] and hi - lo <= C and (lo - starts[d]) % C == 0
        assert step == (lo - starts[d]) // C
        assert ver == (0 if d < 3 else n1 if d < 6 else n1 + n2)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), trained.parameters()))
    nbytes = ph.byte_counts_by_hand(tables, tokens[:-1].numpy(), tokens[1:].numpy()).sum()
    assert loss == pytest.approx(per.mean(), rel=1e-9)
    assert bpb == pytest.approx(per.sum() / (nbytes * math.log(2)), rel=1e-9)
    assert any(line.startswith("ttt_lora:start docs=10 phases=3 phase_ends=[3, 6, 10]") for line in log)
    assert sum(line.startswith("ttt_lora:phase ") for line in log) == 2


def doc_context_reference(model, tokens, start, n):
    """Per-position NLL of one document by the documented rule, one forward per position: position r of chunk
    k = r // C sees the document's tokens from max(0, (k+1)C - L) up to r (and predicts token r+1)."""
    out = np.empty(n)
    for r in range(n):
        s = max(0, (r // C + 1) * C - L)
        x = tokens[start + s:start + r + 1][None]
        y = tokens[start + s + 1:start + r + 2][None]
        with torch.no_grad():
            out[r] = model.token_nll(x, y, True)[0, -1].item()
    return out


def test_without_updates_every_document_is_scored_with_its_own_chunked_context(setup):
    """lr 0 everywhere: the scores are the base model's under the documented context rule, long documents
    (40 and 30 positions > EVAL_SEQ_LEN=16) included, and a document never sees the previous one."""
    rt, model, _, bc, tokens, starts = setup
    cfg = lora_cfg(lora_lr=0.0, ttt_global_lr=0.0)
    *_, per, led, _ = run_lora(cfg, rt, model, tokens, bc)
    assert led.verify(rt)["score_before_update"]
    for d in (0, 2, 3, 6):
        n = DOC_LENGTHS[d]
        ref = doc_context_reference(model, tokens, starts[d], n)
        np.testing.assert_allclose(per[starts[d]:starts[d] + n], ref, rtol=1e-5, atol=1e-5)
    # Across a boundary the sliding eval sees the previous document; the per-document eval does not.
    sl = np.zeros(tokens.numel() - 1)
    tg.eval_sliding(cfg, rt, model.token_nll, tokens, bc, True, per_position=sl)
    assert np.abs(per[starts[1]:starts[1] + 9] - sl[starts[1]:starts[1] + 9]).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Causality: within a document, within a phase, across phases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc,rel", [(2, 2), (4, 6), (8, 9)])
def test_lora_scores_are_causal_and_information_only_flows_forward(setup, baseline, doc, rel):
    """Perturb token j (relative position `rel` of document `doc`, phase 1, 2 or 3 of 3):
    - every position before j-1 keeps its score exactly (the rest of its document and everything earlier);
    - position j-1 (whose target is token j) changes;
    - the other documents of the same phase keep their scores exactly (adapters are per document and the
      phase's global pass comes after all of them);
    - documents of later phases change (the global pass carried token j to the base), and in the last phase
      nothing after the document changes;
    - positions of the same document at least L after token j, outside every window holding it, change:
      the adapter, trained on token j's chunk, carried it forward."""
    rt, model, _, bc, tokens, starts = setup
    a = baseline[3]
    j = starts[doc] + rel
    *_, b, led, _ = run_lora(lora_cfg(), rt, model, perturb_token(tokens, j), bc)
    assert led.verify(rt)["score_before_update"]
    np.testing.assert_array_equal(a[:j - 1], b[:j - 1])
    assert a[j - 1] != b[j - 1]
    phase = 0 if doc < 3 else 1 if doc < 6 else 2
    ends = starts + np.array(DOC_LENGTHS)
    phase_docs = [range(0, 3), range(3, 6), range(6, 10)]
    for d in phase_docs[phase]:
        if d != doc:
            np.testing.assert_array_equal(a[starts[d]:ends[d]], b[starts[d]:ends[d]], err_msg=f"document {d}")
    later = slice(ends[phase_docs[phase][-1]], None)
    if phase < 2:
        assert np.any(a[later] != b[later])
    else:
        np.testing.assert_array_equal(a[ends[doc]:], b[ends[doc]:])
    if rel + L < DOC_LENGTHS[doc]:
        assert np.any(a[j + L:ends[doc]] != b[j + L:ends[doc]])


def test_adapters_reset_per_document_whatever_ran_before(setup, monkeypatch):
    """Document Y scores the same alone, after a longer document X in an earlier batch, or next to X in the same
    batch (base weights equal: one phase, no global pass). Not resetting the adapter breaks this."""
    rt, model, _, bc, _, _ = setup
    X, Y = 22, 17
    alone, pair = doc_tokens([Y], seed=8), doc_tokens([X, Y], seed=9)
    pair[X:] = alone  # Y's tokens (and the final BOS) after X
    single = dict(ttt_phase_docs="")

    def y_scores(tokens, **kw):
        *_, per, led, _ = run_lora(lora_cfg(**single, **kw), rt, model, tokens, bc)
        assert led.verify(rt)["score_before_update"]
        return per[-Y:]

    ref = y_scores(alone, lora_batch_docs=1)
    np.testing.assert_array_equal(y_scores(pair, lora_batch_docs=1), ref)  # X first (longer), then Y, row 0 both
    np.testing.assert_allclose(y_scores(pair, lora_batch_docs=2), ref, rtol=1e-5, atol=1e-6)  # Y in row 1
    no_adapt = y_scores(alone, lora_batch_docs=1, lora_lr=0.0)
    assert np.abs(no_adapt - ref).max() > 1e-3  # the adapter does change Y's later chunks
    np.testing.assert_array_equal(no_adapt[:C], ref[:C])  # ... never its first chunk (fresh adapter = identity)
    reset = tg.LoraBank.reset
    calls = []

    def reset_once(self):
        if not calls:
            reset(self)
        calls.append(1)

    monkeypatch.setattr(tg.LoraBank, "reset", reset_once)
    assert np.abs(y_scores(pair, lora_batch_docs=1) - ref).max() > 1e-3  # X's adapter leaks into Y


# ---------------------------------------------------------------------------------------------
# Illegal variants are caught by the ledger
# ---------------------------------------------------------------------------------------------


def train_then_score_doc(cfg, rt, base_model, tokens, bc, start, n):
    """The real pieces in the illegal order on one document: each chunk trains the adapter, then is scored
    by it. Returns (ledger, per-position scores of the document)."""
    model = copy.deepcopy(base_model)
    total = tokens.numel() - 1
    bank = tg.make_lora_bank(dataclasses.replace(cfg, lora_batch_docs=1), model)
    opt = tg.lora_optimizer(cfg, bank.params())
    ledger, per = tg.LegalityLedger(total), np.zeros(n)
    ledger.record_scores([0, start + n], [start, total], 0)  # the other documents, legally scored
    buckets = tg.lora_window_buckets(C, L)
    with tg.frozen_parameters(model), bank.installed():
        for k in range(-(-n // C)):
            s, e, _ = tg.lora_window(k, C, L, buckets)
            e = min(e, n)
            x, y = tokens[start + s:start + e][None], tokens[start + s + 1:start + e + 1][None]
            loss = model.token_nll(x, y, True)[0, k * C - s:].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ledger.record_adapter_steps([0], k + 1, [start + k * C], [start + e])
            with torch.no_grad():
                per[k * C:e] = model.token_nll(x, y, True)[0, k * C - s:].numpy()
            ledger.record_scores([start + k * C], [start + e], 0, doc=0, adapter_step=k + 1)
    return ledger, per


def test_training_an_adapter_before_scoring_its_chunk_is_caught(setup):
    rt, model, _, bc, tokens, starts = setup
    cfg = lora_cfg()
    start, n = starts[2], DOC_LENGTHS[2]
    ledger, per = train_then_score_doc(cfg, rt, model, tokens, bc, start, n)
    res = ledger.verify(rt)
    assert res["scored_exactly_once"] is True and res["adapter_within_document"] is True
    assert res["adapter_score_before_update"] is False and res["score_before_update"] is False
    assert res["global_score_before_update"] is True
    with pytest.raises(RuntimeError, match="legality violation"):
        tg.check_legality(ledger, rt, quiet, "illegal")
    # The causality check has teeth against this variant: token 10 of the document now moves the scores
    # of positions 8 (same chunk, before it).
    _, per2 = train_then_score_doc(cfg, rt, model, perturb_token(tokens, start + 10), bc, start, n)
    assert per[8] != per2[8]


def test_a_global_pass_that_reaches_an_unscored_document_is_caught(setup, baseline, monkeypatch):
    """Let the pass after phase p also train on the first document of phase p+1: the ledger says
    global_score_before_update=False, and that document's early scores now depend on its later tokens."""
    rt, model, _, bc, tokens, starts = setup
    monkeypatch.setattr(tg, "global_pass_end", lambda s, e, bounds, p: int(e[bounds[p + 1]]))
    _, _, _, per, led, _ = run_lora(lora_cfg(), rt, model, tokens, bc)
    res = led.verify(rt)
    assert res["scored_exactly_once"] is True and res["adapter_score_before_update"] is True
    assert res["global_score_before_update"] is False and res["score_before_update"] is False
    with pytest.raises(RuntimeError, match="legality violation"):
        tg.check_legality(led, rt, quiet, "illegal")
    j = starts[3] + 5  # document 3 opens phase 2; the illegal pass trained on all of it
    *_, per2, _, _ = run_lora(lora_cfg(), rt, model, perturb_token(tokens, j), bc)
    assert np.any(per[starts[3]:j - 1] != per2[starts[3]:j - 1])
    assert np.any(baseline[3] != per)


def test_ledger_adapter_records_unit():
    rt = tg.Runtime(device=torch.device("cpu"))

    def ledger(adapter_steps, spans):
        led = tg.LegalityLedger(12)
        for lo, hi, d, step in spans:
            led.record_scores([lo], [hi], 0, doc=d, adapter_step=step)
        for d, step, lo, hi in adapter_steps:
            led.record_adapter_steps([d], step, [lo], [hi])
        return led.verify(rt)

    legal = [(0, 4, 0, 0), (4, 8, 0, 1), (8, 12, 1, 0)]
    res = ledger([(0, 1, 0, 4)], legal)
    assert res["scored_exactly_once"] and res["score_before_update"] and res["adapter_within_document"]
    assert res["adapter_steps"] == 1 and res["global_score_before_update"]
    # doc 0's step 1 trained through position 7, then scored [4, 8) with it
    res = ledger([(0, 1, 0, 8)], legal)
    assert not res["adapter_score_before_update"] and not res["score_before_update"]
    assert res["adapter_within_document"]  # [0, 8) is doc 0's own
    # a span scored at step 0 is not affected by later steps; one at step 2 sees the cumulative history
    res = ledger([(0, 1, 0, 2), (0, 2, 2, 3)], [(0, 4, 0, 0), (4, 8, 0, 2), (8, 12, 1, 0)])
    assert res["adapter_score_before_update"]
    res = ledger([(0, 1, 0, 6), (0, 2, 2, 3)], [(0, 4, 0, 0), (4, 8, 0, 2), (8, 12, 1, 0)])
    assert not res["adapter_score_before_update"]
    # doc 1's adapter trained on doc 0's (already scored) positions: legal order, wrong document
    res = ledger([(1, 1, 0, 4)], [(0, 4, 0, 0), (4, 8, 1, 0), (8, 12, 1, 1)])
    assert res["adapter_score_before_update"] and not res["adapter_within_document"]
    with pytest.raises(RuntimeError, match="legality violation"):
        led = tg.LegalityLedger(12)
        led.record_scores([0, 4, 8], [4, 8, 12], 0, doc=[0, 1, 1], adapter_step=[0, 0, 1])
        led.record_adapter_steps([1], 1, [0], [4])
        tg.check_legality(led, rt, quiet, "test")
    # interleaved documents: doc 0's adapter may not span doc 1's positions between its own
    res = ledger([(0, 1, 0, 12)], [(0, 4, 0, 0), (4, 8, 1, 0), (8, 12, 0, 0)])
    assert not res["adapter_within_document"]
    res = ledger([(0, 1, 4, 4)], legal)  # an empty training span
    assert not res["adapter_within_document"]


# ---------------------------------------------------------------------------------------------
# LoRA math
# ---------------------------------------------------------------------------------------------


def test_fresh_adapter_is_exactly_the_base_model_and_the_hook_is_W_plus_BA_per_row(setup):
    rt, model, _, _, tokens, _ = setup
    cfg = lora_cfg(lora_batch_docs=2)
    model = copy.deepcopy(model)
    x = tokens[:2 * L].view(2, L)
    with torch.no_grad():
        base = model.raw_logits(x, True)
    bank = tg.make_lora_bank(cfg, model)
    assert len(bank.sites) == 6 * cfg.num_layers + 1  # q,k,v,o,up,down per block + the head
    with torch.no_grad(), bank.installed():
        assert torch.equal(model.raw_logits(x, True), base)
    assert all(m.lora is None for m in model.modules() if isinstance(m, tg.CastedLinear)) and model.head_lora is None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in bank.params():
            t.copy_(0.3 * torch.randn(t.shape, generator=g))
        with bank.installed():
            adapted = model.raw_logits(x, True)
    assert (adapted - base).abs().max() > 1e-2
    for b in range(2):  # row b == the model with every target W replaced by W + B_b A_b (head: output only)
        ref = copy.deepcopy(model)
        head = None
        with torch.no_grad():
            for obj, attr, _, A, B in bank.sites:
                if attr == "head_lora":
                    head = model.tok_emb.weight + B[b] @ A[b]
                else:
                    name = next(n for n, m in model.named_modules() if m is obj)
                    ref.get_submodule(name).weight.add_(B[b] @ A[b])
            z = ref.hidden(x[b:b + 1], True) @ head.T
        torch.testing.assert_close(adapted[b:b + 1], z, rtol=1e-4, atol=1e-4)
    with bank.installed():
        assert torch.equal(tg.leaky_relu_sq_up(model.blocks[0].mlp.fc, torch.ones(2, 3, 32), "triton"),
                           tg.leaky_relu_sq_up(model.blocks[0].mlp.fc, torch.ones(2, 3, 32), "off"))


def test_lora_adam_is_beta1_zero_with_l2_decay_by_hand():
    cfg = lora_cfg(lora_lr=0.1, lora_beta2=0.9, lora_wd=0.5)
    p0 = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    c = torch.tensor([[1.0, 0.25, -3.0]], dtype=torch.float64)
    p = p0.clone().requires_grad_(True)
    opt = tg.lora_optimizer(cfg, [p])
    lr, b2, wd, eps = 0.1, 0.9, 0.5, cfg.adam_eps
    hand, v = p0.clone(), torch.zeros_like(p0)
    for t in (1, 2):
        (c * p).sum().backward()  # dL/dp = c
        opt.step()
        opt.zero_grad()
        g = c + wd * hand  # L2 decay enters the gradient
        v = b2 * v + (1 - b2) * g * g
        hand = hand - lr * g / ((v / (1 - b2 ** t)).sqrt() + eps)  # beta1 = 0: the step uses g itself
        torch.testing.assert_close(p.detach(), hand, rtol=1e-12, atol=1e-12)
    assert (hand - p0).abs().min() > 0.05


def test_one_adapter_step_is_adam_on_the_first_chunk_mean_nll(setup):
    """A document of two chunks takes exactly one adapter step; its result equals a hand Adam step on the
    autograd gradient of chunk 0's mean NLL (first Adam step: p - lr * g' / (|g'| + eps), g' = g + wd * p)."""
    rt, model, _, bc, tokens, starts = setup
    cfg = lora_cfg(lora_batch_docs=2, lora_lr=0.01)
    model = copy.deepcopy(model)
    start, n = starts[3], DOC_LENGTHS[3]  # 7 positions: chunks [0, 4) and [4, 7)
    bank = tg.make_lora_bank(cfg, model)
    x, y = tokens[start:start + C][None], tokens[start + 1:start + C + 1][None]
    with tg.frozen_parameters(model), bank.installed():
        loss = model.token_nll(x.expand(2, C), y.expand(2, C), True)[0].mean()  # row 0's chunk-0 mean NLL
        grads = torch.autograd.grad(loss, bank.params())
    p0 = [t.detach().clone() for t in bank.params()]
    ledger, sums = tg.LegalityLedger(tokens.numel() - 1), torch.zeros(3, dtype=torch.float64)
    with tg.frozen_parameters(model), bank.installed():
        steps = tg.lora_score_batch(cfg, rt, model.token_nll, bank, tokens, bc, True, np.array([3]), starts,
                                    starts + np.array(DOC_LENGTHS), sums, ledger, 0, True)
    assert steps == 1 and sums[1].item() == n
    assert [a.tolist() for a in ledger.adapter_steps] == [[[3, 1, start, start + C]]]
    for got, g, p in zip(bank.params(), grads, p0):
        g = g + cfg.lora_wd * p
        want = p - cfg.lora_lr * g / (g.abs() + cfg.adam_eps)
        torch.testing.assert_close(got.detach()[0], want[0], rtol=1e-4, atol=1e-7)
    assert any((got.detach()[0] != p[0]).any() for got, p in zip(bank.params(), p0))


# ---------------------------------------------------------------------------------------------
# Budget guard, warmup, dispatch, config
# ---------------------------------------------------------------------------------------------


def test_budget_guard_stops_adapting_and_scores_the_rest_like_fresh_adapters(setup, monkeypatch):
    rt, model, _, bc, tokens, starts = setup
    monkeypatch.setattr(tg, "LORA_GUARD_MIN_BATCHES", 1)
    log = Recorder()
    _, _, info, per, led, _ = run_lora(lora_cfg(eval_budget_seconds=1e-9), rt, model, tokens, bc, log=log)
    res = led.verify(rt)
    assert res["scored_exactly_once"] and res["score_before_update"] and not np.isnan(per).any()
    first = [2, 0, 1]  # batch 1 of phase 1: its 3 documents, longest first
    assert info["budget_stopped"] and info["adapted_docs"] == 3 and info["global_steps"] == 0
    assert info["lora_doc_steps"] == sum(-(-DOC_LENGTHS[d] // C) - 1 for d in first) == res["adapter_steps"]
    assert any(line.startswith("ttt_lora:budget_stop after batch 1/4") for line in log)
    *_, frozen, _, _ = run_lora(lora_cfg(lora_lr=0.0, ttt_global_lr=0.0), rt, model, tokens, bc)
    rest = slice(starts[3], None)
    np.testing.assert_array_equal(per[rest], frozen[rest])


def test_compile_warmup_uses_synthetic_tokens_and_leaves_weights_untouched(setup):
    rt, model, _, _, _, _ = setup
    model = copy.deepcopy(model)
    cfg = lora_cfg()
    fns = tg.EvalFns(model, rt)
    bank = tg.make_lora_bank(cfg, model)
    before = tg.state_checksum(model)
    tg.warm_lora_graphs(cfg, rt, fns, bank, True)
    assert tg.state_checksum(model) == before
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(t.grad is None for t in bank.params())
    assert all(not B.any() for *_, B in bank.sites)
    assert all(m.lora is None for m in model.modules() if isinstance(m, tg.CastedLinear))


def test_lora_warmup_does_not_invalidate_the_eval_graph_warmed_before_it(setup, monkeypatch):
    """run_evaluation warms the plain eval graph, then LoRA TTT's: installing and removing adapters must leave
    the model as the first graph's guards saw it, or plain/sliding eval recompiles inside the eval budget."""
    rt, model, _, _, _, _ = setup
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **dict(kw, backend="eager")))
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    rt = dataclasses.replace(rt, compile=True)
    cfg = lora_cfg()
    fns = tg.EvalFns(model, rt)
    tg.warm_eval_graph(cfg, rt, fns.nll, True)
    tg.warm_lora_graphs(cfg, rt, fns, tg.make_lora_bank(cfg, model), True)
    warmed = tg.compiled_graph_count()
    tg.warm_eval_graph(cfg, rt, fns.nll, True)
    assert tg.compiled_graph_count() == warmed
    torch._dynamo.reset()


def test_global_pass_micro_batch_is_one_ranks_share_of_a_chunk():
    """(rows, EVAL_SEQ_LEN) micro-batches of the global SGD pass: a 32K-token chunk is 16 sequences of 2048,
    so 2 rows per rank at 8 ranks (not EVAL_BATCH_SEQS=32 rows, 30 of them padding), 16 at 1 rank."""
    cfg = tg.Hyperparameters(ttt_global_chunk_tokens=32768, eval_seq_len=2048, eval_batch_seqs=32)
    rows = {w: tg.global_micro_rows(cfg, tg.Runtime(device=torch.device("cpu"), world_size=w)) for w in (1, 2, 8, 64)}
    assert rows == {1: 16, 2: 8, 8: 2, 64: 1}
    small = tg.Hyperparameters(ttt_global_chunk_tokens=32768, eval_seq_len=512, eval_batch_seqs=32)
    assert tg.global_micro_rows(small, tg.Runtime(device=torch.device("cpu"))) == 32  # capped at EVAL_BATCH_SEQS


class SlowFirstBatch(tg.Runtime):
    """A CPU Runtime whose first sync() takes 2 s: stands in for device work still queued when a batch returns."""
    slept = False

    def sync(self):
        if not self.slept:
            self.slept = True
            time.sleep(2.0)


def test_budget_guard_counts_the_device_work_of_each_batch(setup, monkeypatch):
    """The batch times the guard projects from end after a device sync: 2 s of queued work in the first batch
    projects the remaining batches past a 4 s budget (on CPU without it the projection is about 1-2 s)."""
    rt, model, _, bc, tokens, _ = setup
    monkeypatch.setattr(tg, "LORA_GUARD_MIN_BATCHES", 1)
    log = Recorder()
    _, _, info, *_ = run_lora(lora_cfg(eval_budget_seconds=4.0), SlowFirstBatch(device=rt.device), model, tokens,
                              bc, log=log)
    assert info["budget_stopped"] and info["adapted_docs"] == 3, log


@pytest.mark.parametrize("budget", [1e-9, 1e9])
def test_compile_warmup_covers_every_graph_of_the_eval(setup, monkeypatch, budget):
    """Compiled LoRA TTT (dynamo with the eager backend: same graphs and guards, no codegen): once the
    warmup has run, neither a full run (adapted scoring, global SGD passes) nor a budget stop (adaptation
    off, scoring under no-grad) compiles anything new."""
    rt, model, _, bc, tokens, _ = setup
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **dict(kw, backend="eager")))
    monkeypatch.setattr(tg, "LORA_GUARD_MIN_BATCHES", 1)
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    rt = dataclasses.replace(rt, compile=True)
    cfg = lora_cfg(eval_budget_seconds=budget)
    fns = tg.EvalFns(model, rt)
    tg.warm_lora_graphs(cfg, rt, fns, tg.make_lora_bank(cfg, model), True)
    warmed = tg.compiled_graph_count()
    total = tokens.numel() - 1
    log = Recorder()
    _, _, info = tg.eval_ttt_lora_phased(cfg, rt, model, fns.lora_nll, fns.global_nll, tokens, bc, True,
                                         tg.LegalityLedger(total), log, time.perf_counter())
    assert info["budget_stopped"] == (budget < 1) and (info["global_steps"] > 0) == (budget > 1)
    assert warmed > 0 and tg.compiled_graph_count() == warmed
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["lora_phased", "sgd"])
def test_run_evaluation_dispatches_on_ttt_mode(setup, monkeypatch, mode):
    rt, model, _, bc, tokens, _ = setup
    monkeypatch.setattr(tg, "load_artifact_model", lambda cfg, rt, path: copy.deepcopy(model))
    cfg = lora_cfg(ttt_mode=mode, quantized_plain_eval=False, sliding_window_enabled=False, ttt_epochs=1)
    log, report = Recorder(), {}
    tg.run_evaluation(cfg, rt, "unused.ptz", tokens[:129], bc, log, report)
    res = report["results"]
    text = "\n".join(log)
    assert re.search(r"^legality: positions=128 scored_exactly_once=True score_before_update=True$", text, re.M)
    if mode == "sgd":
        assert "quantized_ttt_lora" not in res and "quantized_ttt_lora" not in report["eval_seconds"]
        assert re.search(r"^quantized_ttt val_loss:", text, re.M) and "ttt_mode" not in res["quantized_ttt"]
        return
    assert re.search(r"^quantized_ttt_lora val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8} eval_time:\d+ms$", text, re.M)
    assert not re.search(r"^quantized_ttt val_loss:", text, re.M)
    assert re.search(r"^legality_lora: adapter_steps=\d+ global_score_before_update=True "
                     r"adapter_score_before_update=True adapter_within_document=True$", text, re.M)
    assert "quantized_ttt_lora" in report["eval_seconds"] and res["quantized_ttt_lora"]["lora_doc_steps"] > 0
    assert res["quantized_ttt"] == dict(res["quantized_ttt_lora"], ttt_mode="lora_phased")
    assert report["legality"]["adapter_within_document"] is True


def test_config_fields_presets_and_validation():
    rec = tg.load_config(environ={})
    assert rec.ttt_mode == "sgd"
    fr = tg.load_config(environ={"PRESET": "frontier"})
    assert (fr.ttt_mode, fr.lora_rank, fr.lora_lr, fr.lora_beta2, fr.lora_wd, fr.lora_chunk_tokens,
            fr.lora_batch_docs, fr.ttt_phase_docs, fr.ttt_global_lr, fr.ttt_global_momentum, fr.ttt_global_epochs,
            fr.ttt_global_chunk_tokens) == ("lora_phased", 80, 1e-4, 0.99, 0.5, 48, 64, "833,1666,2500", 0.001,
                                            0.9, 1, 32768)
    assert tg.lora_target_list(fr.lora_targets) == ["q", "k", "v", "o", "up", "down", "head"]
    tg.validate_config(fr, 8)
    mg = tg.load_config(environ={"PRESET": "minigolf"})
    assert mg.ttt_mode == "sgd" and mg.lora_rank == 8 and mg.lora_chunk_tokens == 32 and mg.lora_batch_docs == 8
    tg.validate_config(dataclasses.replace(mg, ttt_mode="lora_phased"), 1)
    env = tg.load_config(environ={"PRESET": "minigolf", "TTT_MODE": "lora_phased", "LORA_TARGETS": "q,v,head"})
    assert env.ttt_mode == "lora_phased" and tg.lora_target_list(env.lora_targets) == ["q", "v", "head"]
    tg.validate_config(tiny_config(lora_chunk_tokens=48), 1)  # sgd mode: the LoRA chunk bound is not checked
    bad = [(dict(lora_targets="q,x"), "LORA_TARGETS"),
           (dict(lora_targets=" , "), "LORA_TARGETS"), (dict(ttt_phase_docs="5,3"), "TTT_PHASE_DOCS"),
           (dict(ttt_phase_docs="a"), "TTT_PHASE_DOCS"), (dict(lora_rank=0), "LORA_RANK"),
           (dict(lora_beta2=1.0), "LORA_BETA2"), (dict(ttt_global_momentum=-0.1), "TTT_GLOBAL_MOMENTUM"),
           (dict(lora_batch_docs=0), "LORA_BATCH_DOCS"), (dict(ttt_global_epochs=-1), "TTT_GLOBAL_EPOCHS"),
           (dict(lora_chunk_tokens=32), "LORA_CHUNK_TOKENS")]
    with pytest.raises(tg.ConfigError, match="TTT_MODE"):
        tg.validate_config(tiny_config(ttt_mode="lora"), 1)
    for overrides, name in bad:  # LoRA TTT's settings are checked when it is on, and only then
        with pytest.raises(tg.ConfigError, match=name):
            tg.validate_config(tiny_config(ttt_mode="lora_phased", **overrides), 1)
        tg.validate_config(tiny_config(ttt_mode="sgd", **overrides), 1)
    with pytest.raises(tg.ConfigError, match="LORA_RANK"):
        tg.load_config(environ={"LORA_RANKS": "4"})  # typo guard knows the new names


# ---------------------------------------------------------------------------------------------
# 2 ranks == 1 rank (torchrun, gloo)
# ---------------------------------------------------------------------------------------------


def test_two_ranks_score_like_one(tmp_path):
    """tests/dist_worker.py lora: both ranks run the 2-rank eval and a local 1-rank eval on the same model and
    tokens; val_bpb within 1e-6 relative, same global steps, and the cross-rank ledger proves legality."""
    proc = run_script({}, tmp_path, script=ROOT / "tests" / "dist_worker.py", nproc=2, args=["lora"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = rank_results(tmp_path, "LORA_OK")
    for ln in lines:
        f = dict(kv.split("=") for kv in ln.split()[1:])
        one, two = float(f["bpb1"]), float(f["bpb2"])
        assert abs(one - two) <= 1e-6 * abs(one), ln
        assert int(f["global_steps"]) > 0 and int(f["my_spans"]) > 0 and f["legal"] == "True"
