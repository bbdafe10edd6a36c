"""Optimizer tests: Newton-Schulz, Muon (row norm, Nesterov, decoupled WD, sharding), routing, schedules,
weight averaging, warmup snapshot/restore, gradient scaling across world sizes."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import tg, tiny_config

NS = (3.4445, -4.7750, 2.0315)
CPU = torch.device("cpu")



def ns5_scalar(x, steps=5):
    """The quintic a*x + b*x^3 + c*x^5 iterated `steps` times (acts on each singular value)."""
    a, b, c = NS
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return x


def my_ns5(G, steps=5):
    """Independent Newton-Schulz: work on the wide orientation, Frobenius-normalise, quintic steps."""
    a, b, c = NS
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ (A @ X))
    return X.T if tall else X


def rownorm(G):
    return G / G.norm(dim=1, keepdim=True).clamp_min(1e-7)


# ------------------------------------------------------------------------------------------------
# Newton-Schulz
# ------------------------------------------------------------------------------------------------


def test_ns5_acts_as_the_quintic_on_singular_values():
    """X = U f(S/||G||_F) V^T exactly (same singular vectors), f = the iterated quintic."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(24, 10), (10, 24), (16, 16)]:
        G = torch.randn(*shape, generator=gen, dtype=torch.float64)
        X = tg.newton_schulz5(G, 5, torch.float64)
        assert X.shape == G.shape and X.dtype == torch.float64
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        want = U @ torch.diag(ns5_scalar(S / (G.norm() + 1e-7))) @ Vh
        torch.testing.assert_close(X, want, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(X, my_ns5(G), rtol=1e-9, atol=1e-9)
    # the number of steps is honoured
    G = torch.randn(8, 12, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(tg.newton_schulz5(G, 2, torch.float64), my_ns5(G, 2), rtol=1e-9, atol=1e-9)


def test_ns5_band_of_singular_values():
    """Band derived from the quintic: for x in [0.0015, 1], f^5(x) in [0.68, 1.2024]; f^5(x) <= 1.2024 always.

    Gaussian 64x32 matrices have x = sigma/||G||_F in about [0.06, 0.3], so every singular value lands in
    the band; a random square matrix has near-zero singular values that 5 steps cannot lift, so for
    128x128 the band holds for the well-conditioned part and for a matrix with a bounded condition number.
    """
    lo, hi = 0.67, 1.21
    gen = torch.Generator().manual_seed(1)
    for shape in [(64, 32), (32, 64)]:
        for _ in range(3):
            G = torch.randn(*shape, generator=gen)
            sv = torch.linalg.svdvals(tg.newton_schulz5(G, 5, torch.float32).double())
            assert sv.min() >= lo and sv.max() <= hi, (shape, sv.min().item(), sv.max().item())
            assert sv.max() > 1.0  # not already exactly orthogonal: the quintic overshoots by design
    G = torch.randn(128, 128, generator=gen)
    x0 = torch.linalg.svdvals(G.double()) / G.double().norm()
    sv = torch.linalg.svdvals(tg.newton_schulz5(G, 5, torch.float32).double())  # both sorted descending
    assert sv.max() <= hi
    ok = x0 >= 0.0015
    assert ok.sum() >= 100
    assert sv[ok].min() >= lo
    Q1, _ = torch.linalg.qr(torch.randn(128, 128, generator=gen, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(128, 128, generator=gen, dtype=torch.float64))
    S = torch.linspace(0.05, 1.0, 128, dtype=torch.float64)
    sv = torch.linalg.svdvals(tg.newton_schulz5((Q1 * S) @ Q2.T, 5, torch.float32).double())
    assert sv.min() >= lo and sv.max() <= hi


# ------------------------------------------------------------------------------------------------
# Muon
# ------------------------------------------------------------------------------------------------


def skewed_grad(rows, cols, seed):
    """A gradient whose rows have wildly different norms (so row normalisation matters)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, rows)[torch.randperm(rows, generator=gen)]
    return torch.randn(rows, cols, generator=gen) * scales[:, None]


def muon_for(p, rt, lr=1.0, momentum=0.0, wd=0.0, row_normalize=True):
    return tg.Muon([p], lr=lr, momentum=momentum, weight_decay=wd, ns_steps=5, row_normalize=row_normalize, rt=rt)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (20, 20)])
def test_muon_update_is_ns_of_row_normalised_grad(cpu_runtime, shape):
    rows, cols = shape
    G = skewed_grad(rows, cols, seed=rows)
    p = nn.Parameter(torch.randn(rows, cols, generator=torch.Generator().manual_seed(9)))
    p0 = p.detach().clone()
    p.grad = G.clone()
    muon_for(p, cpu_runtime).step()
    update = (p0 - p.detach()).double()
    scale = math.sqrt(max(1.0, rows / cols))
    want = my_ns5(rownorm(G.double())) * scale
    torch.testing.assert_close(update, want, rtol=1e-4, atol=1e-5)
    without_rownorm = my_ns5(G.double()) * scale
    assert (without_rownorm - want).abs().max() > 0.05  # the row normalisation really matters here
    # and row_normalize=False gives exactly the plain version
    q = nn.Parameter(p0.clone())
    q.grad = G.clone()
    muon_for(q, cpu_runtime, row_normalize=False).step()
    torch.testing.assert_close((p0 - q.detach()).double(), without_rownorm, rtol=1e-4, atol=1e-5)


def test_muon_decoupled_weight_decay(cpu_runtime):
    G = skewed_grad(12, 8, seed=1)
    p0 = torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
    p = nn.Parameter(p0.clone())
    p.grad = G.clone()
    lr, wd = 0.1, 0.5
    muon_for(p, cpu_runtime, lr=lr, wd=wd).step()
    want = p0.double() * (1 - lr * wd) - lr * my_ns5(rownorm(G.double())) * math.sqrt(12 / 8)
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_muon_nesterov_momentum(cpu_runtime):
    mu = 0.9
    g1, g2 = skewed_grad(10, 6, seed=3), skewed_grad(10, 6, seed=4)
    p = nn.Parameter(torch.zeros(10, 6))
    opt = muon_for(p, cpu_runtime, momentum=mu)
    p.grad = g1.clone()
    opt.step()
    after1 = p.detach().clone()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], g1)
    u1 = g1.double() + mu * g1.double()  # m1 = g1, U = g + mu*m
    torch.testing.assert_close(-after1.double(), my_ns5(rownorm(u1)) * math.sqrt(10 / 6), rtol=1e-4, atol=1e-5)
    p.grad = g2.clone()
    opt.step()
    m2 = mu * g1.double() + g2.double()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), m2, rtol=1e-6, atol=1e-6)
    u2 = g2.double() + mu * m2
    step2 = (after1 - p.detach()).double()
    torch.testing.assert_close(step2, my_ns5(rownorm(u2)) * math.sqrt(10 / 6), rtol=1e-4, atol=1e-5)
    # plain (non-Nesterov) momentum would have given a clearly different second step
    assert (my_ns5(rownorm(m2)) * math.sqrt(10 / 6) - step2).abs().max() > 1e-2


def test_muon_round_robin_sharding_matches_single_rank(monkeypatch):
    """Simulate 2 ranks: each orthogonalises only params i % 2 == rank; the summed buffer equals 1 rank's."""
    shapes = [(12, 8), (8, 12), (6, 6), (16, 4), (5, 9)]
    grads = [skewed_grad(r, c, seed=10 + i) for i, (r, c) in enumerate(shapes)]
    init = [torch.randn(r, c, generator=torch.Generator().manual_seed(20 + i)) for i, (r, c) in enumerate(shapes)]

    def run(rt):
        params = [nn.Parameter(w.clone()) for w in init]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = tg.Muon(params, lr=0.05, momentum=0.5, weight_decay=0.1, ns_steps=5, row_normalize=True, rt=rt)
        opt.step()
        return params, opt

    single, _ = run(tg.Runtime(device=CPU))
    captured = {}
    monkeypatch.setattr(tg.dist, "all_reduce", lambda t, op=None: captured.__setitem__("rank1", t.clone()))
    _, opt1 = run(tg.Runtime(device=CPU, rank=1, world_size=2))
    monkeypatch.setattr(tg.dist, "all_reduce", lambda t, op=None: t.add_(captured["rank1"]))
    rank0, opt0 = run(tg.Runtime(device=CPU, rank=0, world_size=2))
    for a, b in zip(single, rank0):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-7)
    # momentum state lives only on the owning rank
    assert [i for i, p in enumerate(opt0.param_groups[0]["params"]) if p in opt0.state] == [0, 2, 4]
    assert [i for i, p in enumerate(opt1.param_groups[0]["params"]) if p in opt1.state] == [1, 3]


# ------------------------------------------------------------------------------------------------
# Parameter routing, LR and momentum schedules
# ------------------------------------------------------------------------------------------------


def test_split_parameters_routing():
    cfg = tiny_config()
    model = tg.GPT(cfg)
    muon, embed, scalar = tg.split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    want_muon = {f"blocks.{i}.{m}.weight" for i in range(cfg.num_layers)
                 for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}
    assert {names[id(p)] for p in muon} == want_muon and len(muon) == 6 * cfg.num_layers
    assert [names[id(p)] for p in embed] == ["tok_emb.weight"]
    scalar_names = {names[id(p)] for p in scalar}
    assert scalar_names == set(names.values()) - want_muon - {"tok_emb.weight"}
    for i in range(cfg.num_layers):
        assert {f"blocks.{i}.resid_mix", f"blocks.{i}.attn.q_gain", f"blocks.{i}.attn_scale",
                f"blocks.{i}.mlp_scale"} <= scalar_names
    assert {"skip_weights", "skip_gates"} <= scalar_names
    assert model.blocks[0].resid_mix.ndim == 2  # 2-D, yet not a Muon matrix
    assert len(muon) + len(embed) + len(scalar) == len(list(model.parameters()))
    opts = tg.build_optimizers(cfg, tg.Runtime(device=CPU), model)
    assert [type(o) for o in opts] == [torch.optim.AdamW, tg.Muon, torch.optim.AdamW]
    assert [o.param_groups[0]["base_lr"] for o in opts] == [cfg.embed_lr, cfg.matrix_lr, cfg.scalar_lr]
    assert [o.param_groups[0]["weight_decay"] for o in opts] == [cfg.embed_wd, cfg.muon_wd, cfg.adam_wd]


@pytest.mark.parametrize("frac,want", [
    (0.0, 1.0), (0.27, 1.0), (0.28, 1.0), (0.5, 0.5 / 0.72), (0.64, 0.5), (0.82, 0.18 / 0.72), (1.0, 0.0),
])
def test_lr_multiplier_values(frac, want):
    assert tg.lr_multiplier(frac, 0.72, 0.0) == pytest.approx(want, abs=1e-12)


def test_lr_multiplier_min_lr_floor_and_shape():
    assert tg.lr_multiplier(1.0, 0.72, 0.1) == pytest.approx(0.1)
    assert tg.lr_multiplier(0.95, 0.72, 0.1) == pytest.approx(0.1)  # (0.05/0.72 = 0.069) floored
    assert tg.lr_multiplier(0.64, 0.72, 0.1) == pytest.approx(0.5)  # above the floor: untouched
    assert tg.lr_multiplier(1.2, 0.72, 0.0) == 0.0  # overshooting the budget never goes negative
    assert tg.lr_multiplier(0.99, 0.0, 0.0) == 1.0  # no warmdown at all
    grid = np.linspace(0, 1, 201)
    vals = [tg.lr_multiplier(f, 0.72, 0.0) for f in grid]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert max(abs(a - b) for a, b in zip(vals, vals[1:])) < 0.01  # continuous, linear to 0


def test_muon_momentum_warmup():
    cfg = tg.Hyperparameters()
    for step, want in [(0, 0.92), (375, 0.9375), (750, 0.955), (1500, 0.99), (1501, 0.99), (10**6, 0.99)]:
        assert tg.muon_momentum_at(cfg, step) == pytest.approx(want, abs=1e-12)
    assert tg.muon_momentum_at(tg.Hyperparameters(muon_momentum_warmup_steps=0), 0) == 0.99


# ------------------------------------------------------------------------------------------------
# Weight averaging
# ------------------------------------------------------------------------------------------------


class TwoParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3, 4))
        self.b = nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))


def set_weights(model, a, b):
    with torch.no_grad():
        model.a.copy_(a)
        model.b.copy_(b)


def test_ema_closed_form_and_apply():
    d = 0.8
    cfg = tiny_config(weight_averaging="ema", ema_decay=d)
    model = TwoParams()
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen).bfloat16())
    set_weights(model, *w0)
    avg = tg.WeightAverager(cfg, model)
    ws = [(torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen).bfloat16()) for _ in range(6)]
    for step, w in enumerate(ws, 1):
        set_weights(model, *w)
        avg.update(step, 0.1 * step)
    k = len(ws)
    for idx in range(2):
        want = d ** k * w0[idx].double() + sum((1 - d) * d ** (k - i) * ws[i - 1][idx].double()
                                               for i in range(1, k + 1))
        assert avg.shadow[idx].dtype == torch.float32
        torch.testing.assert_close(avg.shadow[idx].double(), want, rtol=1e-6, atol=1e-6)
    lines = []
    avg.apply(lines.append)
    assert model.a.dtype == torch.float32 and model.b.dtype == torch.bfloat16
    assert torch.equal(model.a.detach(), avg.shadow[0])
    assert torch.equal(model.b.detach(), avg.shadow[1].bfloat16())
    assert any("ema" in ln for ln in lines)


def test_swa_mean_of_eligible_snapshots():
    cfg = tiny_config(weight_averaging="swa", swa_start_frac=0.5, swa_every=4)
    model = TwoParams()
    avg = tg.WeightAverager(cfg, model)
    gen = torch.Generator().manual_seed(1)
    taken = []
    for step in range(1, 19):
        frac = step / 16
        w = (torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen).bfloat16())
        set_weights(model, *w)
        avg.update(step, frac)
        if frac >= 0.5 and step % 4 == 0:
            taken.append(w)
    assert len(taken) == 3 and avg.count == 3  # steps 8 (frac exactly 0.5), 12, 16
    set_weights(model, torch.full((3, 4), 7.0), torch.full((5,), 7.0))
    avg.apply(lambda line: None)
    torch.testing.assert_close(model.a.detach(), sum(w[0] for w in taken) / 3, rtol=1e-6, atol=1e-6)
    want_b = (sum(w[1].float() for w in taken) / 3).bfloat16()
    assert torch.equal(model.b.detach(), want_b)


def test_swa_without_snapshots_and_none_mode_keep_weights():
    for mode, frac in (("swa", 0.1), ("none", 0.9)):
        cfg = tiny_config(weight_averaging=mode, swa_start_frac=0.5, swa_every=1)
        model = TwoParams()
        avg = tg.WeightAverager(cfg, model)
        for step in range(1, 4):
            set_weights(model, torch.full((3, 4), float(step)), torch.full((5,), float(step)))
            avg.update(step, frac)
        lines = []
        avg.apply(lines.append)
        assert torch.equal(model.a.detach(), torch.full((3, 4), 3.0))
        assert torch.equal(model.b.detach(), torch.full((5,), 3.0, dtype=torch.bfloat16))
        if mode == "swa":
            assert avg.count == 0 and any("no snapshots" in ln for ln in lines)


# ------------------------------------------------------------------------------------------------
# Trainer: warmup snapshot/restore and gradient scaling
# ------------------------------------------------------------------------------------------------


def write_train_shards(tmp_path, vocab, sizes=(700, 450, 900), seed=0):
    rng = np.random.default_rng(seed)
    files = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        tg.write_shard(path, rng.integers(0, vocab, size=n))
        files.append(str(path))
    return files


def test_trainer_snapshot_restore_is_exact(tmp_path, cpu_runtime):
    cfg = tiny_config()
    files = write_train_shards(tmp_path, cfg.vocab_size)
    model = tg.build_model(cfg, cpu_runtime)
    trainer = tg.Trainer(cfg, cpu_runtime, model)
    before = tg.state_checksum(model)
    snap = trainer.snapshot()
    loader = tg.TrainLoader(cfg, cpu_runtime, files)
    first_batch = loader.next_batch()
    trainer.step(first_batch, 0, 0.5, False)
    for looped in (False, True, True):
        trainer.step(loader.next_batch(), 1, 0.5, looped)
    assert tg.state_checksum(model) != before
    assert all(len(opt.state) > 0 for opt in trainer.optimizers)
    assert all(g["lr"] == 0.5 * g["base_lr"] for opt in trainer.optimizers for g in opt.param_groups)
    trainer.restore(snap)
    assert tg.state_checksum(model) == before
    assert all(len(opt.state) == 0 for opt in trainer.optimizers)
    assert all(g["lr"] == g["base_lr"] for opt in trainer.optimizers for g in opt.param_groups)
    assert all(p.grad is None for p in model.parameters())
    # training resumes exactly like a fresh trainer on the same first batch
    trainer.step(first_batch, 0, 1.0, False)
    fresh = tg.build_model(cfg, cpu_runtime)
    assert tg.state_checksum(fresh) == before
    tg.Trainer(cfg, cpu_runtime, fresh).step(first_batch, 0, 1.0, False)
    assert tg.state_checksum(fresh) == tg.state_checksum(model)


def capture_clipped_grads(monkeypatch):
    """Record the gradients Trainer.step hands to gradient clipping (after accumulation and all-reduce)."""
    seen = []

    def fake_clip(params, max_norm, *a, **k):
        seen.append([p.grad.detach().clone() for p in params])
        return torch.zeros(())

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", fake_clip)
    return seen


def make_batches(cfg, n, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (n, 4, cfg.train_seq_len + 1), generator=gen)
    return [(b[:, :-1], b[:, 1:]) for b in ids]


def test_trainer_accumulates_the_mean_gradient(monkeypatch, cpu_runtime):
    cfg = tiny_config(grad_accum_base=2)
    model = perturb_model(tg.GPT(cfg))
    ref = clone_model(model)
    batches = make_batches(cfg, 2, seed=0)
    loss = sum(ref(x, y) for x, y in batches) / 2
    loss.backward()
    seen = capture_clipped_grads(monkeypatch)
    tg.Trainer(cfg, cpu_runtime, model).step(batches, 0, 1.0, False)
    for g, p in zip(seen[0], ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def clone_model(model):
    other = tg.GPT(model.cfg)
    other.load_state_dict(model.state_dict())
    assert tg.state_checksum(other) == tg.state_checksum(model)
    return other


def perturb_model(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def test_ttt_sgd_step_uses_mean_cross_entropy(cpu_runtime):
    """One TTT epoch with plain SGD moves the weights by -lr * grad(mean CE over the chunk) (the record's TTT step).

    Regression test: the summed token NLL must be divided by the chunk's token count, not scaled by a share.
    """
    cfg = tiny_config(ttt_epochs=1, ttt_grad_clip=0.0)
    L = cfg.eval_seq_len
    model = perturb_model(tg.GPT(cfg), seed=3)
    ref = clone_model(model)
    tokens = torch.randint(0, cfg.vocab_size, (3 * L + 1,), generator=torch.Generator().manual_seed(4))
    c0, c1 = 0, 2 * L
    x, y = tokens[c0:c1].view(2, L), tokens[c0 + 1:c1 + 1].view(2, L)
    ref(x, y, True).backward()  # mean CE over the chunk's 2*L targets
    lr = 1.0  # large enough that (before - after) / lr is not swamped by float32 rounding of the weights
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    fns = tg.EvalFns(model, cpu_runtime)
    ledger = tg.LegalityLedger(3 * L)
    version = tg.ttt_train_chunk(cfg, cpu_runtime, model, fns.loss_sum, opt, tokens, c0, c1, lr, True, ledger, 0)
    assert version == 1 and ledger.updates == [(1, c1 - 1)]  # trained on positions up to the chunk's last
    for b, p, r in zip(before, model.parameters(), ref.parameters()):
        torch.testing.assert_close((b - p.detach()) / lr, r.grad, rtol=1e-3, atol=2e-6)


def test_gptq_reserve_is_measured_projected_and_logged(monkeypatch, cpu_runtime):
    """GPTQ_RESERVE_SECONDS=-1: one synthetic calibration batch is timed (twice, the faster kept), projected to
    GPTQ_CALIBRATION_BATCHES and multiplied; an explicit value or no wallclock cap is taken as given."""
    cfg = tiny_config(max_wallclock_seconds=600.0, gptq_reserve_seconds=-1.0, gptq_calibration_batches=7,
                      gptq_reserve_multiple=2.0)
    model = tg.build_model(cfg, cpu_runtime)
    clock = iter([0.0, 0.9, 1.0, 1.5, 5.0])  # two timed collections: 0.9 s, then 0.5 s
    monkeypatch.setattr(tg.time, "perf_counter", lambda: next(clock))
    calls = []
    monkeypatch.setattr(tg, "collect_hessians", lambda rt, m, batches, looped: calls.append(
        [x.shape for b in batches for x, _ in b]))
    lines = []
    reserve, projected = tg.resolve_gptq_reserve(cfg, cpu_runtime, model, lines.append)
    assert projected == pytest.approx(0.5 * 7) and reserve == pytest.approx(2.0 * 3.5 + tg.RESERVE_SLACK_SECONDS)
    seqs = cfg.train_batch_tokens // cfg.train_seq_len // cfg.grad_accum_base
    assert calls == [[(seqs, cfg.train_seq_len)] * cfg.grad_accum_base] * 2  # one real-shaped batch, twice
    assert "0.500s per batch x 7 = 3.50s projected" in lines[0]
    assert tg.resolve_gptq_reserve(tiny_config(gptq_reserve_seconds=3.0), cpu_runtime, model, print) == (3.0, None)
    assert tg.resolve_gptq_reserve(tiny_config(max_wallclock_seconds=0.0, gptq_reserve_seconds=-1.0),
                                   cpu_runtime, model, print) == (0.0, None)
    clock = iter([0.0, 400.0, 0.0, 400.0])
    monkeypatch.setattr(tg.time, "perf_counter", lambda: next(clock))
    with pytest.raises(tg.ConfigError, match="GPTQ_CALIBRATION_BATCHES"):
        tg.resolve_gptq_reserve(cfg, cpu_runtime, model, print)


def test_gptq_reserve_measurement_on_a_real_model_is_positive(cpu_runtime):
    """Unpatched: the measured reserve is a positive number of seconds below the cap."""
    cfg = tiny_config(max_wallclock_seconds=600.0, gptq_reserve_seconds=-1.0)
    reserve, projected = tg.resolve_gptq_reserve(cfg, cpu_runtime, tg.build_model(cfg, cpu_runtime), print)
    assert 0 < projected and tg.RESERVE_SLACK_SECONDS < reserve < 600
