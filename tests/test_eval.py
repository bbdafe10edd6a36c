"""Tests of the EVALUATION section of train_gpt.py: sliding windows scored exactly once, the legality
ledger, causality of sliding and score-first TTT, the TTT budget guard and eval-only reproduction
(the challenge's scoring rules and the record's evaluation)."""
import copy
import dataclasses
import math
import time

import numpy as np
import pytest
import torch

from conftest import tg, tiny_config
import pipeline_helpers as ph



def quiet(*args, **kwargs):
    """A log function that drops lines."""


class Recorder(list):
    """A log function that keeps lines."""

    def __call__(self, line, console=True):
        self.append(line)


# ---------------------------------------------------------------------------------------------
# Sliding windows
# ---------------------------------------------------------------------------------------------

COMBOS = [(total, L, s) for total in (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 129, 1000)
          for L in (1, 2, 3, 8, 16, 64) for s in sorted({1, 2, 3, 5, L // 2, L - 1, L}) if 1 <= s <= L]


def test_sliding_windows_tile_every_position_exactly_once():
    assert len(COMBOS) > 300
    for total, L, s in COMBOS:
        ws, lo, hi = tg.sliding_windows(total, L, s)
        tag = (total, L, s)
        assert ws.dtype == lo.dtype == hi.dtype == np.int64, tag
        counts = np.zeros(total, dtype=np.int64)
        for a, b in zip(lo, hi):
            counts[a:b] += 1
        assert np.all(counts == 1), tag
        # Independent count: one window for the first L positions, then one per stride of remainder.
        assert len(ws) == 1 + max(0, -(-(total - L) // s)), tag
        assert ws[0] == 0 and lo[0] == 0 and hi[0] == min(L, total), tag
        assert np.all(ws % s == 0) and np.all(np.diff(ws) == s), tag
        assert np.all(lo[1:] == hi[:-1]), tag  # in order: no window (tail included) re-scores anything
        assert np.all(hi > lo) and np.all(hi <= total), tag
        assert np.all(hi - ws <= L), tag  # every scored position lies inside its window
        later = ws > 0
        assert np.all(lo[later] - ws[later] == L - s), tag  # full context for every later window


# ---------------------------------------------------------------------------------------------
# Legality ledger
# ---------------------------------------------------------------------------------------------


def test_ledger_accepts_a_legal_score_first_sequence(cpu_runtime):
    led = tg.LegalityLedger(30)
    led.record_scores([0, 8], [8, 10], 0)
    led.record_update(1, 9)  # trained on positions 0..9, all already scored
    led.record_update(2, 9)
    led.record_scores([10, 20], [20, 30], 2)  # recorded out of order on purpose below
    led.scores.reverse()
    res = led.verify(cpu_runtime)
    assert res == {"positions": 30, "scored_exactly_once": True, "score_before_update": True,
                   "scored_tokens": 30, "updates": 2}
    lines = Recorder()
    assert tg.check_legality(led, cpu_runtime, lines, "test") == res
    assert lines == ["legality: positions=30 scored_exactly_once=True score_before_update=True"]


@pytest.mark.parametrize("spans", [
    [(0, 10), (8, 20)],            # overlap
    [(0, 10), (11, 20)],           # gap
    [(0, 10), (0, 10), (10, 20)],  # same span twice (a second pass)
    [(1, 20)],                     # position 0 never scored
    [(0, 19)],                     # last position never scored
    [(0, 10), (10, 10), (10, 20)],  # empty span
    [],
])
def test_ledger_rejects_spans_that_are_not_exactly_once(cpu_runtime, spans):
    led = tg.LegalityLedger(20)
    for a, b in spans:
        led.record_scores([a], [b], 0)
    res = led.verify(cpu_runtime)
    assert res["scored_exactly_once"] is False and res["score_before_update"] is True
    with pytest.raises(RuntimeError, match="legality violation"):
        tg.check_legality(led, cpu_runtime, quiet, "test")


@pytest.mark.parametrize("max_pos,version,ok", [
    (9, 1, True),    # trained through 9, scoring starts at 10: legal
    (10, 1, False),  # trained on position 10 (its target token 11) before scoring it
    (25, 1, False),
    (25, 0, True),   # the span was scored under version 0, before that update
])
def test_ledger_score_before_update_boundary(cpu_runtime, max_pos, version, ok):
    led = tg.LegalityLedger(20)
    led.record_scores([0], [10], 0)
    led.record_update(1, max_pos)
    led.record_scores([10], [20], version)
    res = led.verify(cpu_runtime)
    assert res["scored_exactly_once"] is True
    assert res["score_before_update"] is ok


def test_ledger_uses_cumulative_training_history(cpu_runtime):
    # Version 2 was trained only up to 5, but version 1 already saw position 15: scoring [10,20) under
    # version 2 is still contaminated.
    led = tg.LegalityLedger(20)
    led.record_scores([0], [10], 0)
    led.record_update(1, 15)
    led.record_update(2, 5)
    led.record_scores([10], [20], 2)
    assert led.verify(cpu_runtime)["score_before_update"] is False


# ---------------------------------------------------------------------------------------------
# Sliding / plain evaluation against direct computation
# ---------------------------------------------------------------------------------------------

VOCAB = 64


@pytest.fixture(scope="module")
def tiny_setup():
    """(cfg, model, byte tables, ByteCounter, val tokens) with a perturbed tiny looped model."""
    rt = tg.Runtime(device=torch.device("cpu"))
    cfg = tiny_config()
    model = ph.perturbed_model(cfg, rt, seed=3)
    tables = ph.random_byte_tables(VOCAB, seed=4)
    return cfg, model, tables, tg.ByteCounter(tables, rt.device), ph.random_val_tokens(160, VOCAB, seed=5)


def direct_plain(model, tables, tokens, L, looped):
    """(loss, bpb) of non-overlapping L-token sequences computed in one batch, bytes counted in numpy."""
    n = (tokens.numel() - 1) // L
    x, y = tokens[:n * L].view(n, L), tokens[1:n * L + 1].view(n, L)
    with torch.no_grad():
        nll = model.token_nll(x, y, looped).double()
    nbytes = ph.byte_counts_by_hand(tables, x.numpy(), y.numpy()).sum()
    return nll.sum().item() / nll.numel(), nll.sum().item() / (nbytes * math.log(2))


def test_sliding_with_stride_equal_to_window_is_plain_eval(cpu_runtime, tiny_setup):
    cfg, model, tables, bc, tokens = tiny_setup
    cfg = dataclasses.replace(cfg, eval_stride=cfg.eval_seq_len)
    assert (tokens == tg.BOS_ID).any() and (tokens.numel() - 1) % cfg.eval_seq_len == 0
    for looped in (False, True):
        sliding = tg.eval_sliding(cfg, cpu_runtime, model.token_nll, tokens, bc, looped)
        plain = tg.eval_plain(cfg, cpu_runtime, model.token_nll, tokens, bc, looped)
        direct = direct_plain(model, tables, tokens, cfg.eval_seq_len, looped)
        assert sliding == pytest.approx(plain, rel=1e-6, abs=1e-6)
        assert plain == pytest.approx(direct, rel=1e-6, abs=1e-6)
    assert direct[0] > 1.0 and direct[1] > 0.5  # a non-trivial model and byte count


def test_sliding_per_position_scores_match_per_window_reference(cpu_runtime, tiny_setup):
    cfg, model, tables, bc, tokens = tiny_setup
    L, s = cfg.eval_seq_len, cfg.eval_stride
    for total in (160, 150):  # 150: the stream does not end on a stride or window boundary
        toks = tokens[:total + 1]
        per = np.full(total, np.nan)
        led = tg.LegalityLedger(total)
        loss, bpb = tg.eval_sliding(cfg, cpu_runtime, model.token_nll, toks, bc, True, ledger=led, per_position=per)
        assert not np.isnan(per).any()
        res = led.verify(cpu_runtime)
        assert res["scored_exactly_once"] and res["scored_tokens"] == total
        ref = np.empty(total)
        nbytes = 0
        for p in range(total):
            ws = 0 if p < L else s * -(-(p - L + 1) // s)  # the stride-grid start with L-s <= p-ws < L
            end = min(ws + L, total)
            with torch.no_grad():
                nll = model.token_nll(toks[ws:end][None], toks[ws + 1:end + 1][None], True)
            ref[p] = nll[0, p - ws].item()
            nbytes += int(ph.byte_counts_by_hand(tables, toks[p].item(), toks[p + 1].item()))
        np.testing.assert_allclose(per, ref, rtol=1e-5, atol=1e-5)
        assert loss == pytest.approx(ref.sum() / total, rel=1e-6)
        assert bpb == pytest.approx(ref.sum() / (nbytes * math.log(2)), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Causality and score-first TTT
# ---------------------------------------------------------------------------------------------


def ttt_cfg(**kw):
    # 128 scored positions, 4 TTT chunks of 32, window 16, stride 4
    base = dict(ttt_lr=0.2, ttt_epochs=2, ttt_momentum=0.9, eval_budget_seconds=1e9)
    base.update(kw)
    return tiny_config(**base)


def run_ttt(cfg, rt, base_model, tokens, bc, ledger=None, log=quiet):
    """eval_ttt on a fresh copy of base_model: (loss, bpb, info, per_position, ledger, model)."""
    model = copy.deepcopy(base_model)
    fns = tg.EvalFns(model, rt)
    total = tokens.numel() - 1
    per = np.full(total, np.nan)
    ledger = ledger or tg.LegalityLedger(total)
    loss, bpb, info = tg.eval_ttt(cfg, rt, model, fns.loss_sum, fns.nll, tokens, bc, True, ledger, log,
                                  time.perf_counter(), per_position=per)
    return loss, bpb, info, per, ledger, model


def perturb_token(tokens, j):
    """A copy of tokens with token j replaced by a different id."""
    out = tokens.clone()
    new = (int(tokens[j]) + 7) % VOCAB
    out[j] = 5 if new == tg.BOS_ID else new
    assert out[j] != tokens[j]
    return out


@pytest.mark.parametrize("j", [1, 30, 45, 64, 65, 127, 128])
def test_sliding_scores_are_causal(cpu_runtime, tiny_setup, j):
    cfg, model, _, bc, tokens = tiny_setup
    toks = tokens[:129]
    a, b = np.zeros(128), np.zeros(128)
    tg.eval_sliding(cfg, cpu_runtime, model.token_nll, toks, bc, True, per_position=a)
    tg.eval_sliding(cfg, cpu_runtime, model.token_nll, perturb_token(toks, j), bc, True, per_position=b)
    np.testing.assert_array_equal(a[:max(j - 1, 0)], b[:max(j - 1, 0)])
    assert a[j - 1] != b[j - 1]  # teeth: position j-1 has token j as its target


@pytest.mark.parametrize("j", [20, 45, 64, 96, 97, 100])
def test_ttt_scores_are_causal_and_training_carries_information_forward(cpu_runtime, tiny_setup, j):
    _, model, _, bc, tokens = tiny_setup
    cfg = ttt_cfg()
    L, last_chunk_start = cfg.eval_seq_len, 96
    toks = tokens[:129]
    *_, a, _, _ = run_ttt(cfg, cpu_runtime, model, toks, bc)
    *_, b, _, _ = run_ttt(cfg, cpu_runtime, model, perturb_token(toks, j), bc)
    np.testing.assert_array_equal(a[:j - 1], b[:j - 1])
    assert a[j - 1] != b[j - 1]
    # Positions >= j+L never see token j inside their window, so they can only move through training:
    # they do when token j is a training target (position j-1 outside the last chunk), and must not when
    # position j-1 lies in the last chunk, which is never trained on.
    if j - 1 < last_chunk_start:
        assert np.any(a[j + L:] != b[j + L:])
    else:
        np.testing.assert_array_equal(a[j + L:], b[j + L:])


def test_ttt_trains_score_first_and_never_on_the_last_chunk(cpu_runtime, tiny_setup):
    _, model, tables, bc, tokens = tiny_setup
    cfg = ttt_cfg(ttt_epochs=3)
    toks = tokens[:129]
    total, C = 128, cfg.ttt_chunk_tokens
    log = Recorder()
    loss, bpb, info, per, led, trained = run_ttt(cfg, cpu_runtime, model, toks, bc, log=log)
    chunks = total // C
    assert info == {"chunks": chunks, "trained_chunks": chunks - 1, "sgd_steps": (chunks - 1) * 3,
                    "budget_stopped": False}
    versions = [v for v, _ in led.updates]
    assert versions == list(range(1, (chunks - 1) * 3 + 1))
    max_trained = max(m for _, m in led.updates)
    assert max_trained == (chunks - 1) * C - 1 < (chunks - 1) * C  # the last chunk is never trained on
    # Each chunk's update only covers that chunk.
    for v, m in led.updates:
        assert m == ((v - 1) // 3 + 1) * C - 1
    res = led.verify(cpu_runtime)
    assert res["scored_exactly_once"] and res["score_before_update"] and res["scored_tokens"] == total
    assert res["updates"] == (chunks - 1) * 3
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), trained.parameters()))
    # Chunk 0 is scored before any update, so it equals the sliding eval; later chunks differ.
    sl = np.zeros(total)
    tg.eval_sliding(cfg, cpu_runtime, model.token_nll, toks, bc, True, per_position=sl)
    np.testing.assert_array_equal(per[:C], sl[:C])
    assert np.mean(per[C:] != sl[C:]) > 0.9
    # The returned loss/bpb are the per-position scores' mean and their bytes.
    nbytes = ph.byte_counts_by_hand(tables, toks[:-1].numpy(), toks[1:].numpy()).sum()
    assert loss == pytest.approx(per.mean(), rel=1e-9)
    assert bpb == pytest.approx(per.sum() / (nbytes * math.log(2)), rel=1e-9)
    assert any(line.startswith("ttt:start chunks=4") for line in log)


def test_train_before_score_is_caught_by_the_ledger(cpu_runtime, tiny_setup):
    """Compose the real pieces in the illegal order: train on a chunk, then score it."""
    _, base_model, _, bc, tokens = tiny_setup
    cfg = ttt_cfg()
    toks = tokens[:129]
    total, C, L, s = 128, cfg.ttt_chunk_tokens, cfg.eval_seq_len, cfg.eval_stride

    def illegal(tokens_in):
        model = copy.deepcopy(base_model)
        fns = tg.EvalFns(model, cpu_runtime)
        ws, lo, hi = tg.sliding_windows(total, L, s)
        n_chunks = -(-total // C)
        chunk_of = np.minimum(lo // C, n_chunks - 1)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
        ledger, per = tg.LegalityLedger(total), np.zeros(total)
        sums = torch.zeros(3, dtype=torch.float64)
        version = 0
        for ci in range(n_chunks):
            c0, c1 = ci * C, min((ci + 1) * C, total)
            version = tg.ttt_train_chunk(cfg, cpu_runtime, model, fns.loss_sum, opt, tokens_in, c0, c1,
                                         cfg.ttt_lr, True, ledger, version)
            idx = np.nonzero(chunk_of == ci)[0]
            tg.score_windows(cfg, cpu_runtime, fns.nll, tokens_in, bc, True, ws[idx], lo[idx], hi[idx], sums,
                             ledger=ledger, version=version, per_position=per)
        return ledger, per

    ledger, per = illegal(toks)
    res = ledger.verify(cpu_runtime)
    assert res["scored_exactly_once"] is True and res["score_before_update"] is False
    with pytest.raises(RuntimeError, match="legality violation"):
        tg.check_legality(ledger, cpu_runtime, quiet, "illegal")
    # The causality check used above has teeth against this variant: changing token 45 now moves
    # scores of earlier positions of its chunk (they were scored after training on token 45).
    _, per2 = illegal(perturb_token(toks, 45))
    assert np.any(per[32:44] != per2[32:44])


def test_ttt_step_is_plain_sgd_on_the_chunk_mean_cross_entropy(cpu_runtime, tiny_setup):
    _, base_model, _, _, tokens = tiny_setup
    cfg = ttt_cfg(ttt_grad_clip=0.0, ttt_epochs=1, ttt_momentum=0.0)  # no clip/momentum: Δθ = −lr·∇
    L, lr, c0, c1 = cfg.eval_seq_len, 0.01, 32, 64
    model, ref = copy.deepcopy(base_model), copy.deepcopy(base_model)
    fns = tg.EvalFns(model, cpu_runtime)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    tg.ttt_train_chunk(cfg, cpu_runtime, model, fns.loss_sum, opt, tokens, c0, c1, lr, True,
                       tg.LegalityLedger(160), 0)
    ref.train()
    n = (c1 - c0) // L
    ref(tokens[c0:c1].view(n, L), tokens[c0 + 1:c1 + 1].view(n, L), True).backward()  # GPT.forward = mean CE
    for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(), base_model.parameters()):
        torch.testing.assert_close(p.detach(), p0.detach() - lr * q.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_ttt_budget_guard_stops_training_once_the_projection_is_over_budget(cpu_runtime, tiny_setup, monkeypatch):
    """The projection starts after TTT_GUARD_MIN_CHUNKS trained chunks; over budget, training stops and the
    remaining chunks are still scored exactly once."""
    monkeypatch.setattr(tg, "TTT_GUARD_MIN_CHUNKS", 2)
    _, model, _, bc, tokens = tiny_setup
    cfg = ttt_cfg(eval_budget_seconds=1e-9)
    log = Recorder()
    loss, bpb, info, per, led, _ = run_ttt(cfg, cpu_runtime, model, tokens[:129], bc, log=log)
    assert info["budget_stopped"] is True and info["trained_chunks"] == 2
    assert info["sgd_steps"] == 2 * cfg.ttt_epochs and info["chunks"] == 4
    assert max(m for _, m in led.updates) == 2 * cfg.ttt_chunk_tokens - 1
    res = led.verify(cpu_runtime)
    assert res["scored_exactly_once"] and res["score_before_update"] and res["scored_tokens"] == 128
    assert not np.isnan(per).any() and loss == pytest.approx(per.mean(), rel=1e-9)
    assert any("ttt:budget_stop after chunk 2/4" in line for line in log)


class SlowDevice(tg.Runtime):
    """A CPU Runtime whose sync() takes 0.4 s: stands in for device work still queued when a step returns."""

    def sync(self):
        time.sleep(0.4)


def test_ttt_budget_guard_counts_the_device_work_of_each_chunk(tiny_setup, monkeypatch):
    """The chunk times the guard projects from end after a device sync: with 0.4 s of queued work per chunk,
    2 chunks trained and 2 left project past a 1.5 s budget (without the sync they would take milliseconds)."""
    monkeypatch.setattr(tg, "TTT_GUARD_MIN_CHUNKS", 2)
    _, model, _, bc, tokens = tiny_setup
    log = Recorder()
    _, _, info, _, _, _ = run_ttt(ttt_cfg(eval_budget_seconds=1.5), SlowDevice(device=torch.device("cpu")),
                                  model, tokens[:129], bc, log=log)
    assert info["budget_stopped"] is True and info["trained_chunks"] == 2, log


def test_ttt_budget_guard_waits_for_steady_state_chunks(cpu_runtime, tiny_setup):
    """Within budget every non-final chunk is trained and the guard never fires."""
    _, model, _, bc, tokens = tiny_setup
    cfg = ttt_cfg(eval_budget_seconds=1e9)
    _, _, info, _, _, _ = run_ttt(cfg, cpu_runtime, model, tokens[:129], bc)
    assert info["budget_stopped"] is False and info["trained_chunks"] == 3


# ---------------------------------------------------------------------------------------------
# Eval-only reproduces the logged numbers (subprocess)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return ph.tiny_pipeline(tmp_path_factory)


def test_eval_only_reproduces_the_logged_numbers(tmp_path, tmp_path_factory, tiny_run):
    data_dir, small_val, _ = ph.smoke_data(tmp_path_factory)
    run_dir = tmp_path / "eval_only"
    env = dict(ph.tiny_run_env(data_dir, small_val, run_dir, "tiny_eval_only"), EVAL_ONLY=tiny_run["artifact"])
    ph.run_script(ph.SCRIPT, env, cwd=tmp_path)
    ev_log = (run_dir / "tiny_eval_only.txt").read_text()
    src_log = tiny_run["log"]
    assert "train_loss" not in ev_log and f"eval_only: scoring {tiny_run['artifact']}" in ev_log
    for name in ("quantized", "quantized_sliding_window", "quantized_ttt"):
        assert ph.metric(ev_log, name) == ph.metric(src_log, name), name
    assert "ttt:start chunks=4" in src_log and "ttt:start chunks=4" in ev_log
    n = str(ph.SMALL_VAL_TOKENS)
    for log in (src_log, ev_log):
        assert ph.legality_lines(log) == [(n, "True", "True")] * 2  # sliding and TTT
        assert f"val_tokens: {n}" in log
