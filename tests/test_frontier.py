"""The leading entry's model and optimiser techniques (PRESET=frontier): each switch alone on top of the
record, the leader's parameter count, SmearGate's BOS mask, the sparse attention gate, the two-lane parallel
decoder and the Polar Express Newton-Schulz schedule."""
import math
import os
import sys
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tg, tiny_config
import pipeline_helpers as ph

CPU = torch.device("cpu")


def count(cfg):
    """Parameter count of a freshly built model."""
    return sum(p.numel() for p in tg.GPT(cfg).parameters())


def test_frontier_preset_builds_the_leaders_parameter_count():
    """PRESET=frontier: 35,945,671 parameters, the figure in the leading entry's logs."""
    cfg = tg.load_config({"PRESET": "frontier"})
    tg.validate_config(cfg, 8)
    assert count(cfg) == 35945671


@pytest.mark.parametrize("env,delta", [({"SMEAR_GATE": "1"}, 13), ({"SPARSE_ATTN_GATE": "1"}, 11 * 8 * 12),
                                       ({"PARALLEL_LANES": "1"}, 11 * 6), ({"MUON_NS_COEFFS": "polar_express"}, 0)])
def test_each_switch_alone_on_top_of_the_record(env, delta):
    """Every technique can be switched on by itself over PRESET=record; the parameters it adds are exactly
    its own (smear: 12 weights + lambda; gate: 8 heads x 12 per layer; lanes: 2 + 2x2 scalars per layer)."""
    base = tg.load_config({})
    cfg = tg.load_config(env)
    tg.validate_config(cfg, 8)
    assert count(cfg) - count(base) == delta


def test_lanes_outside_the_decoder_are_refused():
    with pytest.raises(tg.ConfigError, match="PARALLEL_LANES"):
        tg.validate_config(tg.load_config({"PARALLEL_LANES": "1", "PARALLEL_RESIDUAL_START": "4"}), 8)


# --------------------------------------------------------------------------------------------
# SmearGate
# --------------------------------------------------------------------------------------------


def test_smear_gate_never_carries_information_across_bos():
    """Changing the last token (embedding) of document N changes nothing of document N+1 after the smear;
    without the BOS mask (BOS replaced by an ordinary token) it would."""
    cfg = tiny_config(smear_gate=True)
    smear = tg.SmearGate(cfg)
    with torch.no_grad():
        smear.lam.fill_(0.7)
        smear.weight.normal_(generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 5, 6, 7, 1, 8, 9, 10]])  # doc N = positions 0-3, doc N+1 = 4-7
    x = torch.randn(1, 8, cfg.model_dim, generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[0, 3] += 5.0  # the last token of document N
    a, b = smear(x, ids), smear(x2, ids)
    assert torch.equal(a[0, 4:], b[0, 4:])
    assert not torch.allclose(a[0, 3], b[0, 3])
    no_bos = ids.clone()
    no_bos[0, 4] = 11
    assert not torch.allclose(smear(x, no_bos)[0, 4], smear(x2, no_bos)[0, 4])  # the mask is what protects


def test_smear_gate_formula_and_identity_at_init():
    cfg = tiny_config(smear_gate=True)
    smear = tg.SmearGate(cfg)
    ids = torch.tensor([[3, 4, 1, 5]])
    x = torch.randn(1, 4, cfg.model_dim, generator=torch.Generator().manual_seed(2))
    assert torch.equal(smear(x, ids), x)  # lambda = 0
    with torch.no_grad():
        smear.lam.fill_(0.5)
        smear.weight.fill_(0.1)
    out = smear(x, ids)
    for t in range(4):
        g = 0.5 * torch.sigmoid(x[0, t, :cfg.smear_gate_window] @ smear.weight) if t and ids[0, t] != 1 else 0.0
        want = x[0, t] + (g * x[0, t - 1] if t else 0.0)
        torch.testing.assert_close(out[0, t], want)


def test_smear_gate_in_the_full_model_is_bos_masked():
    """Whole GPT with SMEAR_GATE=1: changing document N's last token leaves document N+1's first-layer input
    (embedding after the smear, x0) unchanged."""
    cfg = tiny_config(smear_gate=True)
    model = ph.perturbed_model(cfg, tg.Runtime(device=CPU))
    captured = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: captured.append(args[1].clone()))
    ids = torch.tensor([[1, 5, 6, 7, 1, 8, 9, 10]])
    ids2 = ids.clone()
    ids2[0, 3] = 12
    with torch.no_grad():
        model.hidden(ids), model.hidden(ids2)
    hook.remove()
    assert torch.equal(captured[0][0, 4:], captured[1][0, 4:])
    assert not torch.equal(captured[0][0, 3], captured[1][0, 3])


# --------------------------------------------------------------------------------------------
# Sparse attention output gate
# --------------------------------------------------------------------------------------------


def test_attention_gate_shape_init_window_and_effect():
    """Per layer an (H, 12) weight, zero-initialised so the gated model equals the ungated one exactly;
    the gate reads only the first ATTN_GATE_WINDOW channels and is 2*sigmoid(0.5 * w.x)."""
    cfg = tiny_config(sparse_attn_gate=True, attn_gate_window=6, attn_gate_scale=0.5)
    gated = tg.GPT(cfg)
    plain = tg.GPT(tiny_config())
    gated_only = {k for k in gated.state_dict()} - {k for k in plain.state_dict()}
    assert gated_only == {f"blocks.{i}.attn.attn_gate.weight" for i in range(cfg.num_layers)}
    assert all(gated.state_dict()[k].shape == (cfg.num_heads, 6) and not gated.state_dict()[k].any()
               for k in gated_only)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():  # non-trivial blocks (at init the output projections are zero)
        for k, p in gated.named_parameters():
            if k not in gated_only:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k not in gated_only})
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(gated.token_nll(ids, ids), plain.token_nll(ids, ids))
    gate = gated.blocks[0].attn.attn_gate
    with torch.no_grad():
        gate.weight.normal_(generator=torch.Generator().manual_seed(4))
    x = torch.randn(1, 5, cfg.model_dim, generator=torch.Generator().manual_seed(5))
    x2 = x.clone()
    x2[..., 6:] += 3.0
    torch.testing.assert_close(gate(x), gate(x2))
    torch.testing.assert_close(gate(x), 2 * torch.sigmoid(0.5 * x[..., :6] @ gate.weight.T))
    assert not torch.allclose(gate(x), torch.ones_like(gate(x)))
    with torch.no_grad():
        assert not torch.equal(gated.token_nll(ids, ids), plain.token_nll(ids, ids))  # a trained gate acts


def test_gate_weights_are_stored_int8_per_row():
    """In export the gate tensors become int8 with one fp16 scale per row (head), round trip within half a
    step; the other small tensors stay fp16."""
    cfg = tiny_config(sparse_attn_gate=True)
    model = ph.perturbed_model(cfg, tg.Runtime(device=CPU))
    hessians = {n: torch.eye(p.shape[1]) for n, p in model.state_dict().items() if p.ndim == 2}
    entries = {e["name"]: e for e in tg.quantize_state(cfg, model, hessians)}
    state = tg.dequantize_entries(list(entries.values()))
    for i in range(cfg.num_layers):
        name = f"blocks.{i}.attn.attn_gate.weight"
        e, w = entries[name], model.state_dict()[name]
        assert e["kind"] == "int8row" and e["q"].dtype == torch.int8 and e["scale"].shape == (cfg.num_heads,)
        assert (state[name] - w).abs().max() <= e["scale"].float().max() / 2 + 1e-6
    assert entries["blocks.0.attn.q_gain"]["kind"] == "passthrough"
    assert any("int8 per-row: blocks.attn.attn_gate.weight" in ln for ln in tg.describe_quantization(list(entries.values())))


# --------------------------------------------------------------------------------------------
# Two-lane parallel decoder
# --------------------------------------------------------------------------------------------


def test_two_lane_layer_matches_hand_computation():
    """forward_lanes: A' = r0*A_in + m00*att + m01*mlp and B' = r1*B + m10*att + m11*mlp, with attention
    reading the x0-mixed lane A and the MLP reading lane B."""
    cfg = tiny_config(parallel_lanes=True)
    block = tg.Block(cfg, 4, "sdpa")
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    a, b, x0 = (torch.randn(2, 7, cfg.model_dim, generator=gen) for _ in range(3))
    resid, mix = torch.tensor([1.1, 0.9]), torch.tensor([[1.0, 0.5], [-0.3, 2.0]])
    cos, sin = tg.rope_tables(7, cfg.rope_dims, cfg.rope_base, cfg.train_seq_len, CPU)
    with torch.no_grad():
        got_a, got_b = block.forward_lanes((a, b), x0, cos, sin, resid, mix)
        a_in = block.resid_mix[0] * a + block.resid_mix[1] * x0
        att = block.attn_scale * block.attn(tg.rms_norm(a_in) * block.ln_s, cos, sin)
        mlp = block.mlp_scale * block.mlp(tg.rms_norm(b) * block.ln_s)
    torch.testing.assert_close(got_a, 1.1 * a_in + att + 0.5 * mlp)
    torch.testing.assert_close(got_b, 0.9 * b - 0.3 * att + 2.0 * mlp)


@pytest.mark.parametrize("final", ["mean", "attn", "mlp"])
def test_lanes_run_from_the_start_layer_and_merge_as_configured(final):
    """The model enters two lanes at PARALLEL_RESIDUAL_START, applies the skips to both and returns the
    configured final lane; every lane parameter of the parallel layers receives a gradient."""
    cfg = tiny_config(parallel_lanes=True, parallel_final_lane=final)
    model = ph.perturbed_model(cfg, tg.Runtime(device=CPU))
    model.train()
    calls = []
    for i, block in enumerate(model.blocks):
        orig = block.forward_lanes
        block.forward_lanes = (lambda o, j: lambda *a, **k: (calls.append(j), o(*a, **k))[1])(orig, i)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len), generator=torch.Generator().manual_seed(7))
    for looped in (False, True):
        model(ids, ids, looped).backward()
    assert sorted(set(calls)) == list(range(cfg.parallel_residual_start, cfg.num_layers))
    g = model.lanes.resid.grad
    assert g[cfg.parallel_residual_start:].abs().sum() > 0 and not g[:cfg.parallel_residual_start].any()


# --------------------------------------------------------------------------------------------
# Polar Express Newton-Schulz
# --------------------------------------------------------------------------------------------


def test_polar_express_coefficients_are_the_leaders():
    pe = tg.NS_COEFFS["polar_express"]
    assert len(pe) == 5
    assert pe[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    assert pe[4] == (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)
    assert tg.NS_COEFFS["quintic"] == ((3.4445, -4.7750, 2.0315),)


@pytest.fixture(scope="module")
def real_update_matrices(tmp_path_factory):
    """Muon inputs (Nesterov momentum of row-normalised gradients) of every block matrix of a tiny model
    trained 5 steps on real text (the smoke corpus), as Muon would orthogonalise them."""
    data_dir, _, _ = ph.smoke_data(tmp_path_factory)
    cfg = tg.load_config({"PRESET": "smoke", "DATA_DIR": str(data_dir), "NUM_LAYERS": "4", "MODEL_DIM": "128"})
    train_glob, _, _ = tg.data_paths(cfg)
    rt = tg.Runtime(device=CPU)
    model = tg.build_model(cfg, rt)
    trainer = tg.Trainer(cfg, rt, model)
    loader = tg.TrainLoader(cfg, rt, tg.resolve_files(train_glob, "train"))
    for step in range(5):
        trainer.step(loader.next_batch(), step, 1.0, False)
    for x, y in loader.next_batch():
        model(x, y).backward()
    muon_params = tg.split_parameters(model)[0]
    mats = []
    for p in muon_params:
        u = p.grad.detach().clone()
        mats.append(u / u.norm(dim=1, keepdim=True).clamp_min(1e-7))
    return mats


def singular_spread(X, G):
    """max |sigma - 1| over X's top-k singular values, k = how many of G/||G||_F's exceed 1e-3.

    Directions in which the (rank-deficient) gradient is numerically null stay ~0 under any 5-step
    polynomial, so they would make the spread ~1 for both schedules and the comparison bf16 rounding noise;
    the polynomial is monotone near 0, so X's top-k singular values are those of G's reachable directions."""
    k = int((torch.linalg.svdvals((G / G.norm()).double()) > 1e-3).sum())
    return (torch.linalg.svdvals(X.double())[:k] - 1).abs().max().item()


def test_polar_express_lands_closer_to_orthogonal_on_real_gradients(real_update_matrices):
    """After 5 steps, on every real update matrix, the singular values sit in a tighter band around 1 with
    the leader's per-step coefficients than with the record's fixed triple (fp32 and bf16)."""
    for dtype in (torch.float32, torch.bfloat16):
        wins = []
        for G in real_update_matrices:
            pe = singular_spread(tg.newton_schulz5(G, 5, dtype, tg.NS_COEFFS["polar_express"]), G)
            quintic = singular_spread(tg.newton_schulz5(G, 5, dtype, tg.NS_COEFFS["quintic"]), G)
            wins.append(pe < quintic)
        assert all(wins), (dtype, wins)


def test_muon_uses_the_configured_schedule(cpu_runtime):
    cfg = tiny_config(muon_ns_coeffs="polar_express")
    muon = tg.build_optimizers(cfg, cpu_runtime, tg.GPT(cfg))[1]
    assert muon.ns_coeffs == tg.NS_COEFFS["polar_express"]
    with pytest.raises(tg.ConfigError, match="MUON_NS_COEFFS"):
        tg.validate_config(tiny_config(muon_ns_coeffs="cubic"), 1)


# --------------------------------------------------------------------------------------------
# PRESET=frontier end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory):
    """PRESET=frontier on the smoke corpus at a small shape (CaseOps off: the smoke tokenizer has no case
    pieces), every stage: (log text, summary)."""
    import json
    data_dir, small_val, tok = ph.smoke_data(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("frontier_run")
    env = ph.tiny_run_env(data_dir, small_val, run_dir, "frontier")
    cfg = tg.load_config({"PRESET": "smoke", "DATA_DIR": str(data_dir)})
    train_glob, _, _ = tg.data_paths(cfg)
    env.update(PRESET="frontier", CASEOPS="0", VOCAB_SIZE="1024", TRAIN_FILES=train_glob, TOKENIZER_PATH=str(tok),
               EXPECTED_VAL_TOKENS="0", PARALLEL_RESIDUAL_START="2", MAX_WALLCLOCK_SECONDS="0",
               QUANT_MIN_NUMEL="1024", SIZE_LIMIT_BYTES="4000000", GPTQ_CALIBRATION_BATCHES="1", LQER_TOP_K="2",
               LORA_RANK="8", LORA_BATCH_DOCS="4", LORA_CHUNK_TOKENS="64")  # LoRA TTT at this size (CI time)
    ph.run_script(ph.SCRIPT, env, cwd=run_dir)
    return (run_dir / "frontier.txt").read_text(), json.loads((run_dir / "frontier.summary.json").read_text()), env


def test_frontier_preset_runs_every_stage_legally(frontier_run):
    """Every frontier switch is on in the run, every stage ran, the per-group compressor wrote the artifact,
    LQER corrected tensors, and both legality lines are True."""
    log, summary, _ = frontier_run
    cfg = summary["config"]
    for key, want in (("smear_gate", True), ("sparse_attn_gate", True), ("parallel_lanes", True), ("lqer", True),
                      ("muon_ns_coeffs", "polar_express"), ("compressor", "pergroup"), ("embed_bits", 7)):
        assert cfg[key] == want, key
    for pattern in (r"^warmup:restored weights bit-exactly", r"^GPTQ:collected", r"^lqer: blocks\.",
                    r"^Serialized model quantized\+pergroup: \d+ bytes", r"^quantized val_loss:",
                    r"^quantized_sliding_window val_loss:", r"^quantized_ttt\S* val_loss:"):
        assert re.search(pattern, log, re.M), pattern
    lines = ph.legality_lines(log)
    assert len(lines) >= 2 and all(once == before == "True" for _, once, before in lines)
    assert summary["status"] == "ok" and summary["model_params"] > 0


def test_frontier_packed_copy_runs_exactly_like_the_source(frontier_run, tmp_path):
    """The copy packed with the frontier run's settings (every frontier switch on, the rest folded away)
    trains, exports and evaluates bit for bit like the source and counts its own bytes, which the source run
    counted too."""
    log, summary, env = frontier_run
    out, printed, _ = ph.pack_with_env(env, tmp_path / "packed")
    run_env = dict(env, LOG_DIR=tmp_path, ARTIFACT_PATH=tmp_path / "model.ptz", RUN_ID="packed")
    ph.run_script(out, run_env, cwd=tmp_path)
    packed_log = (tmp_path / "packed.txt").read_text()
    assert ph.train_losses(packed_log) == ph.train_losses(log) and len(ph.train_losses(log)) == 6
    for name in ("pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt_lora"):
        assert ph.metric(packed_log, name) == ph.metric(log, name), name
    assert (tmp_path / "model.ptz").read_bytes() == Path(summary["artifact_path"]).read_bytes()
    assert summary["bytes_code"] == printed == os.path.getsize(out)
    assert summary["code_packed_for"] == tg.pack_switches(tg.load_config(
        {k: str(v) for k, v in env.items() if k.lower() in tg.PACK_SWITCHES or k == "PRESET"}))
    assert summary["code_pack_keeps"] == []  # neither EXPORT_FROM nor FLOAT_CHECKPOINT set: both folded away
    assert summary["code_packed_for"]["float_checkpoint"] == summary["code_packed_for"]["export_from"] == ""
    assert summary["code_packed_by_python"] == "{}.{}".format(*sys.version_info[:2])  # the source run packed it
