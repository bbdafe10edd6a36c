"""Fused kernels: chunked/Triton softcapped CE and the Triton LeakyReLU^2 up-projection agree with the plain
PyTorch paths (values and gradients), the chunked CE saves no (N, V) fp32 tensor, the FUSED_* switches
validate and resolve in the runtime, and train_gpt.py still works without triton."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, clean_env, tg, tiny_config

CAP = 30.0


def ce_inputs(n, v, scale, seed=0, dtype=torch.float32):
    """Random raw logits (n, v) * scale, targets containing ids 0 and v-1, and a random upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[:4] = torch.tensor([0, v - 1, 0, v - 1])
    return z, targets, torch.randn(n, generator=gen)


def nll_and_grad(fn, z, targets, g):
    """(NLL, dNLL.g/dz) of fn(z, targets) for a fresh leaf copy of z."""
    leaf = z.clone().requires_grad_()
    nll = fn(leaf, targets)
    (nll * g).sum().backward()
    return nll.detach(), leaf.grad


def reference(z, targets):
    """The plain path: fp32 softcap, then F.cross_entropy."""
    return tg.softcapped_ce_reference(z, targets, CAP)


# ------------------------------------------------------------------------------------------------
# Chunked PyTorch CE (in process)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [3.0, 1000.0], ids=["moderate", "saturating"])
@pytest.mark.parametrize("chunk_rows", [1, 16, 23, 64, 1000])
def test_chunked_ce_matches_reference(chunk_rows, scale):
    """Values and logit gradients match F.cross_entropy(softcap(z)) for chunks that do and do not divide N."""
    z, targets, g = ce_inputs(64, 97, scale)
    if scale > CAP:
        assert (z.abs() > 3 * CAP).float().mean() > 0.9  # tanh saturates: grads mostly ~0, NLL up to ~2*CAP
    nll_ref, dz_ref = nll_and_grad(reference, z, targets, g)
    nll, dz = nll_and_grad(lambda a, t: tg.ChunkedSoftcappedCE.apply(a, t, CAP, chunk_rows), z, targets, g)
    assert nll.dtype == torch.float32 and dz.dtype == torch.float32
    torch.testing.assert_close(nll, nll_ref, rtol=1e-6, atol=2e-6 * nll_ref.abs().max().item())
    torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=1e-6 * dz_ref.abs().max().item())


def test_chunked_ce_low_precision_input_and_dispatcher():
    """bf16 logits: fp32 NLL equal to the reference, bf16 gradient within one bf16 rounding of it."""
    z, targets, g = ce_inputs(48, 130, 4.0, seed=1, dtype=torch.bfloat16)
    nll_ref, dz_ref = nll_and_grad(reference, z, targets, g)
    nll, dz = nll_and_grad(lambda a, t: tg.softcapped_nll(a, t, CAP, "chunked"), z, targets, g)
    assert nll.dtype == torch.float32 and dz.dtype == torch.bfloat16
    torch.testing.assert_close(nll, nll_ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dz.float(), dz_ref.float(), rtol=2 ** -7, atol=1e-6)


def saved_tensors(fn, z, targets):
    """Tensors autograd saves for backward while computing fn(z, targets) (z requires grad)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(z.clone().requires_grad_(), targets).sum()
    return saved


def test_chunked_ce_saves_no_full_fp32_tensor():
    """bf16 logits: the chunked path saves only z (bf16), targets and an (N,) fp32 lse; the plain path
    (the check's control) saves (N, V) fp32 tensors."""
    n, v = 64, 97
    z, targets, _ = ce_inputs(n, v, 4.0, dtype=torch.bfloat16)
    big_fp32 = lambda ts: [tuple(t.shape) for t in ts if t.dtype == torch.float32 and t.numel() >= n * v]
    assert big_fp32(saved_tensors(reference, z, targets)), "control: the plain path should save (N,V) fp32"
    saved = saved_tensors(lambda a, t: tg.softcapped_nll(a, t, CAP, "chunked"), z, targets)
    assert big_fp32(saved) == []
    assert sorted(str((tuple(t.shape), t.dtype)) for t in saved) == sorted(
        str(s) for s in [((n, v), torch.bfloat16), ((n,), torch.int64), ((n,), torch.float32)])


def perturbed_gpt(cfg, **kwargs):
    """A tiny GPT whose weights (zero-initialised projections included) are moved off their init."""
    torch.manual_seed(0)
    model = tg.GPT(cfg, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_tiny_gpt_chunked_ce_matches_off(monkeypatch):
    """Whole model, looped: FUSED_CE=chunked (several ragged chunks) gives the loss and every parameter
    gradient of FUSED_CE=off within 1e-5 relative; off stays bit-identical to CE over model.logits."""
    cfg = tiny_config()
    monkeypatch.setattr(tg, "CE_CHUNK_ELEMS", 24 * cfg.vocab_size)  # 24-row chunks over 64 rows
    off, chunked = perturbed_gpt(cfg), perturbed_gpt(cfg, fused_ce="chunked")
    gen = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 64, (4, 16), generator=gen), torch.randint(0, 64, (4, 16), generator=gen)
    targets[0, :2] = torch.tensor([0, 63])
    losses = [m(ids, targets, looped=True) for m in (off, chunked)]
    for loss in losses:
        loss.backward()
    assert abs(losses[1].item() / losses[0].item() - 1) < 1e-5
    for (name, p_off), (_, p_ch) in zip(off.named_parameters(), chunked.named_parameters()):
        err = (p_ch.grad - p_off.grad).abs().max() / p_off.grad.abs().max()
        assert err < 1e-5, (name, err.item())
    with torch.no_grad():
        plain = F.cross_entropy(off.logits(ids, True).flatten(0, 1), targets.flatten(), reduction="none")
        assert torch.equal(off.token_nll(ids, targets, True), plain.view(targets.shape))


def test_gptq_mlp_hessian_is_that_of_the_fc_input(tmp_path):
    """The Hessian hook sits on the MLP module (so it also fires when FUSED_MLP bypasses fc): its X^T X is
    exactly that of fc's input."""
    shard = tmp_path / "train_000.bin"
    tg.write_shard(shard, torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(0)).numpy())
    cfg = tiny_config(gptq_calibration_batches=1)
    model = perturbed_gpt(cfg)
    fc_inputs = {i: [] for i in range(cfg.num_layers)}

    def record(i):
        return lambda module, args: fc_inputs[i].append(args[0].reshape(-1, args[0].size(-1)))

    hooks = [b.mlp.fc.register_forward_pre_hook(record(i)) for i, b in enumerate(model.blocks)]
    rt = tg.Runtime(device=torch.device("cpu"))
    loader = tg.TrainLoader(cfg, rt, [str(shard)])
    hessians = tg.collect_hessians(rt, model, [loader.next_batch()], False)
    for h in hooks:
        h.remove()
    for i in range(cfg.num_layers):
        x = torch.cat(fc_inputs[i]).float()
        torch.testing.assert_close(hessians[f"blocks.{i}.mlp.fc.weight"], x.T @ x, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Switches: validation and resolution in the runtime
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("fused_ce", "fast"), ("fused_mlp", "chunked"), ("fused_mlp", "on")])
def test_fused_switches_validate(field, value):
    with pytest.raises(tg.ConfigError, match=field.upper()):
        tg.validate_config(tiny_config(**{field: value}), 1)


def test_fused_switches_resolve_on_cpu(monkeypatch, tmp_path):
    """auto -> chunked CE / plain MLP on CPU, logged in the header; triton on CPU needs TRITON_INTERPRET=1."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rt = tg.setup_runtime(tiny_config(device="cpu", fused_ce="auto", fused_mlp="auto"))
    assert (rt.fused_ce, rt.fused_mlp) == ("chunked", "off")
    model = tg.build_model(tiny_config(), rt)
    assert model.fused_ce == "chunked" and all(b.mlp.fused == "off" for b in model.blocks)
    log = tg.Logger(tiny_config(log_dir=str(tmp_path), run_id="hdr"), rt)
    tg.log_header(tiny_config(), rt, log, "t", "v", "tok")
    assert "fused_ce:chunked fused_mlp:off" in log.path.read_text()
    for field in ("fused_ce", "fused_mlp"):
        with pytest.raises(tg.ConfigError, match=f"{field.upper()}=triton.*TRITON_INTERPRET=1"):
            tg.setup_runtime(tiny_config(device="cpu", **{field: "triton"}))
    if tg.triton is not None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert tg.resolve_fused_kernel("FUSED_MLP", "triton", torch.device("cpu"), "off") == "triton"
    monkeypatch.setattr(tg, "triton", None)
    with pytest.raises(tg.ConfigError, match="not importable"):
        tg.resolve_fused_kernel("FUSED_CE", "triton", torch.device("cuda"), "chunked")
    assert tg.resolve_fused_kernel("FUSED_CE", "auto", torch.device("cuda"), "chunked") == "chunked"


BLOCKERS = {
    "none_shim": "sys.modules['triton'] = None",
    "oserror": ("class Broken:\n"
                "    def find_spec(self, name, path=None, target=None):\n"
                "        if name.split('.')[0] == 'triton':\n"
                "            raise OSError('libcuda.so: cannot open shared object file')\n"
                "sys.meta_path.insert(0, Broken())"),
}
NO_TRITON_SCRIPT = """
import sys
{blocker}
sys.path.insert(0, {root!r})
import torch, train_gpt as tg
assert tg.triton is None
cfg = tg.Hyperparameters(preset="smoke", vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1,
                         rope_dims=4, xsa_last_n=1, parallel_residual_start=1, num_loops=0, train_seq_len=8,
                         train_batch_tokens=32, grad_accum_base=1, eval_seq_len=8, eval_stride=4, ttt_chunk_tokens=8,
                         device="cpu", fused_ce="auto", fused_mlp="auto")
rt = tg.setup_runtime(cfg)
assert (rt.fused_ce, rt.fused_mlp) == ("chunked", "off"), (rt.fused_ce, rt.fused_mlp)
ids = torch.randint(0, 64, (2, 8))
tg.build_model(cfg, rt)(ids, ids).backward()
try:
    tg.resolve_fused_kernel("FUSED_CE", "triton", torch.device("cpu"), "chunked")
    raise SystemExit("FUSED_CE=triton accepted without triton")
except tg.ConfigError as e:
    assert "not importable" in str(e), e
print("OK")
"""


@pytest.mark.parametrize("blocker", sorted(BLOCKERS))
def test_imports_and_trains_without_triton(blocker):
    """With triton unimportable (ImportError, or OSError from a broken install) the script imports, auto
    resolves to the PyTorch paths, a step runs, and FUSED_CE=triton is a clear ConfigError."""
    code = NO_TRITON_SCRIPT.format(blocker=BLOCKERS[blocker], root=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env({}), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# Triton kernels under TRITON_INTERPRET=1 (one fresh subprocess runs every case; see triton_interp_checks)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interp():
    """Results of tests/triton_interp_checks.py run with TRITON_INTERPRET=1; skip when triton is absent."""
    if tg.triton is None:
        pytest.skip("triton is not installed (pip install triton==3.9.0 to run the interpreter checks)")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_interp_checks.py")],
                          env=clean_env({"TRITON_INTERPRET": "1"}), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["ce_fp32_one_tile", "ce_fp32_three_tiles", "ce_fp32_saturated"])
def test_triton_ce_matches_reference_fp32(interp, case):
    """NLL and dz of the Triton CE equal the reference to fp32 rounding, one tile or several ragged ones."""
    r = interp[case]
    assert r["nll_dtype"] == "torch.float32" and r["dz_dtype"] == "torch.float32"
    assert r["tiles"] == (1 if case == "ce_fp32_one_tile" else 3)
    assert r["nll_rel"] < 2e-6 and r["dz_rel"] < 2e-6, r
    if case == "ce_fp32_saturated":
        assert r["saturated_frac"] > 0.8


def test_triton_ce_bf16_logits(interp):
    """bf16 logits: fp32 NLL as exact as in fp32; dz returned in bf16 within one bf16 rounding."""
    r = interp["ce_bf16"]
    assert r["nll_dtype"] == "torch.float32" and r["dz_dtype"] == "torch.bfloat16"
    assert r["nll_rel"] < 2e-6 and r["dz_rel"] < 2 ** -7, r


def test_triton_fused_mlp_matches_plain(interp):
    """act, dx and dW of the fused up-projection vs leaky_relu(x @ W^T, 0.5)^2 (ragged M, N and K tiles);
    fp16 act differs by up to one fp16 rounding because the fused epilogue squares the fp32 accumulator."""
    r32, r16 = interp["mlp_fp32"], interp["mlp_fp16"]
    assert r32["dtypes"] == ["torch.float32"] * 3 and r16["dtypes"] == ["torch.float16"] * 3
    assert 0.3 < r32["negative_frac"] < 0.7  # both LeakyReLU branches exercised
    assert max(r32["act_rel"], r32["dx_rel"], r32["dw_rel"]) < 2e-6, r32
    assert r16["act_rel"] < 2 ** -10 and max(r16["dx_rel"], r16["dw_rel"]) < 2 ** -10, r16


def test_triton_tiny_gpt_matches_plain(interp):
    """Whole tiny GPT with FUSED_CE=FUSED_MLP=triton: loss and every parameter gradient within 1e-5 relative."""
    r = interp["gpt"]
    assert r["loss_rel"] < 1e-5 and r["grad_rel_max"] < 1e-5, r


def test_packed_copy_defines_and_runs_the_kernels(interp):
    """The counted self-extracting copy imports with triton installed and its kernels compute the same values."""
    r = interp["packed"]
    assert r["has_triton"] and r["nll_rel"] < 2e-6 and r["act_rel"] < 2e-6, r


def test_gptq_hessians_see_the_fused_mlp_input(interp):
    """GPTQ's Hessian hook sits on the MLP, so FUSED_MLP=triton (which bypasses fc's forward) keeps every key."""
    r = interp["hessians"]
    assert r["missing"] == [] and r["mlp_fc_keys"] == 5 and r["rel_max"] < 1e-5, r
