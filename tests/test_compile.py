"""torch.compile (inductor on CPU) computes the same function as eager, with a bounded set of graphs.

One module-scoped compiled Trainer is warmed exactly as a real run warms it; every test reuses its graphs,
which keeps the inductor compile cost of this file to one set of variants.
"""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from conftest import tg, tiny_config


def perturb(model, seed=0):
    """Replace the zero-initialised projections' identity behaviour by small random weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """A compiled Trainer after compile_warmup, its eager twin, the loader and the pre-warmup checksum."""
    torch._dynamo.reset()
    tmp = tmp_path_factory.mktemp("compile")
    cfg = tiny_config(warmup_steps=2)
    rt = tg.Runtime(device=torch.device("cpu"), compile=True)
    gen = torch.Generator().manual_seed(0)
    tg.write_shard(tmp / "train.bin", torch.randint(0, cfg.vocab_size, (4000,), generator=gen).numpy())
    model = tg.build_model(cfg, rt)
    perturb(model)
    eager = copy.deepcopy(model)
    trainer = tg.Trainer(cfg, rt, model)
    before = tg.state_checksum(model)
    graphs0 = tg.compiled_graph_count()
    loader = tg.compile_warmup(cfg, rt, trainer, lambda: tg.TrainLoader(cfg, rt, [str(tmp / "train.bin")]),
                               lambda *a, **k: None)
    return dict(cfg=cfg, rt=rt, trainer=trainer, eager=eager, loader=loader, before=before,
                warm_graphs=tg.compiled_graph_count() - graphs0)


def test_warmup_compiles_every_variant_and_restores_bit_exactly(warmed):
    """Warmup compiled train (plain, looped) and eval (plain, looped) graphs and restored the weights."""
    assert warmed["warm_graphs"] >= 4
    assert tg.state_checksum(warmed["trainer"].model) == warmed["before"]
    assert tg.state_checksum(warmed["eager"]) == warmed["before"]
    for opt in warmed["trainer"].optimizers:
        assert len(opt.state) == 0


def test_compiled_train_forward_backward_matches_eager(warmed):
    """Loss and every gradient of the compiled training forward/backward equal eager (float32)."""
    model, eager = warmed["trainer"].model, warmed["eager"]
    x, y = warmed["loader"].next_batch()[0]
    for looped in (False, True):
        model.zero_grad()
        eager.zero_grad()
        comp = warmed["trainer"].loss_fn(x, y, looped)
        comp.backward()
        ref = eager(x, y, looped)
        ref.backward()
        assert torch.allclose(comp, ref, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    model.zero_grad(set_to_none=True)


def test_compiled_newton_schulz_matches_eager(warmed):
    """Muon's compiled orthogonalisation (the CUDA fast path) equals eager NS5 on every warmed matrix shape."""
    muon = warmed["trainer"].optimizers[1]
    assert muon.orthogonalize is not tg.newton_schulz5  # compiled when the runtime compiles
    gen = torch.Generator().manual_seed(11)
    shapes = sorted({tuple(p.shape) for p in muon.param_groups[0]["params"]})
    graphs = tg.compiled_graph_count()
    for shape in shapes:
        G = torch.randn(shape, generator=gen)
        with torch.no_grad():  # as in Muon.step (grad mode is part of the compiled graph's guards)
            fast = muon.orthogonalize(G, muon.ns_steps, muon.rt.ns_dtype, muon.ns_coeffs)  # step()'s call
        slow = tg.newton_schulz5(G, muon.ns_steps, muon.rt.ns_dtype, muon.ns_coeffs)
        assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-5), shape
    assert tg.compiled_graph_count() == graphs  # warmup already compiled every shape


def test_compiled_eval_forward_matches_eager_and_loop_switch_is_not_a_constant(warmed):
    """Compiled per-token NLL equals eager in both variants, and the two variants really differ."""
    cfg, nll = warmed["cfg"], warmed["trainer"].nll_fn
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, cfg.vocab_size, (cfg.eval_batch_seqs, cfg.eval_seq_len), generator=gen)
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        out = {lp: nll(x, y, lp) for lp in (False, True)}
        for lp in (False, True):
            assert torch.allclose(out[lp], warmed["eager"].token_nll(x, y, lp), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[False], out[True])


def test_timed_steps_with_loop_switch_and_eval_compile_nothing_new(warmed):
    """After warmup, training steps (switching looping on mid-way) and a plain eval add no graphs."""
    cfg, rt, trainer = warmed["cfg"], warmed["rt"], warmed["trainer"]
    graphs = tg.compiled_graph_count()
    before = tg.state_checksum(trainer.model)
    for step in range(4):
        trainer.step(warmed["loader"].next_batch(), step, 1.0, looped=step >= 2)
    val = torch.from_numpy(np.concatenate([[1], np.random.default_rng(0).integers(0, cfg.vocab_size, 200)]))
    tables = (np.ones(cfg.vocab_size, np.int16), np.zeros(cfg.vocab_size, bool), np.zeros(cfg.vocab_size, bool))
    tg.eval_plain(cfg, rt, trainer.nll_fn, val, tg.ByteCounter(tables, rt.device), looped=True)
    assert tg.compiled_graph_count() == graphs
    assert tg.state_checksum(trainer.model) != before


def test_compiled_evaluation_of_a_fresh_artifact_model_matches_eager(warmed, tmp_path):
    """After training: dynamo reset, fresh model from the artifact, compiled eval (plain, sliding, TTT) with
    every graph warmed on synthetic tokens first; no graph is compiled while scoring, numbers match eager."""
    cfg, rt, model = warmed["cfg"], warmed["rt"], warmed["trainer"].model
    gen = torch.Generator().manual_seed(0)
    hessians = {}
    for name, p in model.state_dict().items():
        if p.ndim == 2 and p.numel() > cfg.quant_min_numel:
            X = torch.randn(256, p.size(1), generator=gen)
            hessians[name] = X.T @ X
    path = tmp_path / "m.ptz"
    tg.write_artifact(path, tg.quantize_state(cfg, model, hessians), tg.architecture(cfg), "brotli")
    val = torch.from_numpy(np.concatenate([[1], np.random.default_rng(1).integers(0, cfg.vocab_size, 160)]))
    tables = (np.ones(cfg.vocab_size, np.int16), np.zeros(cfg.vocab_size, bool), np.zeros(cfg.vocab_size, bool))
    counter = tg.ByteCounter(tables, rt.device)
    reports = {}
    for compiled in (True, False):
        runtime = dataclasses.replace(rt, compile=compiled)
        reports[compiled] = {}
        tg.run_evaluation(cfg, runtime, path, val, counter, lambda *a, **k: None, reports[compiled])
    assert reports[True]["eval_recompiles_after_warmup"] == 0
    assert reports[True]["eval_graphs_compiled"] >= 2
    for stage in ("quantized", "quantized_sliding_window", "quantized_ttt"):
        a, b = reports[True]["results"][stage]["val_bpb"], reports[False]["results"][stage]["val_bpb"]
        assert abs(a - b) <= 1e-4 * b, (stage, a, b)
    assert reports[True]["results"]["quantized_ttt"]["sgd_steps"] > 0


def test_untraceable_flash_backend_compiles_with_graph_breaks_instead_of_crashing(monkeypatch):
    """A FlashAttention build dynamo cannot trace (e.g. a pybind op) is detected before training; a
    traceable one keeps fullgraph. (Last in this file: the probe resets dynamo's caches.)"""
    import types
    rt = tg.Runtime(device=torch.device("cpu"), compile=True, attention_backend="fa3")

    def traceable(q, k, v, causal=False):
        return tg.sdpa_attention(q, k, v)

    def untraceable(q, k, v, causal=False):
        torch._dynamo.graph_break()
        return tg.sdpa_attention(q, k, v)

    monkeypatch.setitem(tg._FLASH, "fa3", types.SimpleNamespace(flash_attn_func=traceable))
    assert tg.attention_traces_fullgraph(rt)
    monkeypatch.setitem(tg._FLASH, "fa3", types.SimpleNamespace(flash_attn_func=untraceable))
    assert not tg.attention_traces_fullgraph(rt)
