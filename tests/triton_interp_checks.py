"""Run the Triton kernels of train_gpt.py under TRITON_INTERPRET=1 against their plain paths; print JSON.

Invoked by tests/test_kernels.py in a fresh process (the variable must be set before triton decorates the
kernels). Prints one JSON object of measured errors, dtypes and flags on the last stdout line; the tests
decide what passes.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
from conftest import ROOT, tg, tiny_config  # noqa: E402

CAP = 30.0


def max_err(a, b):
    """Largest absolute elementwise difference, as a float."""
    return (a.double() - b.double()).abs().max().item()


def rel_err(a, b):
    """max|a - b| / max|b| (normwise relative error), as a float."""
    return max_err(a, b) / max(b.double().abs().max().item(), 1e-30)


def ce_case(n, v, scale, dtype, block_v, seed):
    """Triton CE vs reference on random logits * scale: errors of NLL and dz, plus dtypes and saturation."""
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[:3] = torch.tensor([0, v - 1, v - 1])
    g = torch.randn(n, generator=gen)
    default_block, tg.CE_BLOCK_V = tg.CE_BLOCK_V, block_v
    out = {}
    for name, fn in (("ref", lambda a: tg.softcapped_ce_reference(a, targets, CAP)),
                     ("triton", lambda a: tg.softcapped_nll(a, targets, CAP, "triton"))):
        leaf = z.clone().requires_grad_()
        nll = fn(leaf)
        (nll * g).sum().backward()
        out[name] = (nll.detach(), leaf.grad)
    tg.CE_BLOCK_V = default_block
    (nll_ref, dz_ref), (nll_tri, dz_tri) = out["ref"], out["triton"]
    return dict(nll_abs=max_err(nll_tri, nll_ref), nll_rel=rel_err(nll_tri, nll_ref),
                dz_abs=max_err(dz_tri, dz_ref), dz_rel=rel_err(dz_tri, dz_ref),
                nll_dtype=str(nll_tri.dtype), dz_dtype=str(dz_tri.dtype), tiles=-(-v // min(block_v, v)),
                saturated_frac=(z.float().abs() > 3 * CAP).float().mean().item())


def mlp_case(m, k, n, dtype, seed):
    """Fused LeakyReLU^2 up-projection vs the plain path: errors of act, dx, dW (relative to the plain path)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    g = torch.randn(m, n, generator=gen).to(dtype)
    res = {}
    for name, fn in (("plain", lambda a, b: F.leaky_relu(a @ b.t(), 0.5).square()),
                     ("triton", tg.FusedLeakyReluSquare.apply)):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        act = fn(a, b)
        (act * g).sum().backward()
        res[name] = (act.detach(), a.grad, b.grad)
    errs = {f"{key}_rel": rel_err(t, p) for key, t, p in zip(("act", "dx", "dw"), res["triton"], res["plain"])}
    return dict(errs, dtypes=[str(t.dtype) for t in res["triton"]],
                negative_frac=(x.float() @ w.float().t() < 0).float().mean().item())


def gpt_pair(**overrides):
    """(plain model, fused model with FUSED_CE=FUSED_MLP=triton) sharing random non-trivial weights."""
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    plain = tg.GPT(cfg)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    fused = tg.GPT(cfg, "sdpa", "triton", "triton")
    fused.load_state_dict(plain.state_dict())
    return cfg, plain, fused


def gpt_case():
    """Loss and per-parameter gradient relative errors of the whole tiny GPT, fused vs plain, looped."""
    _, plain, fused = gpt_pair()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 16), generator=gen)
    targets = torch.randint(0, 64, (2, 16), generator=gen)
    losses = {}
    for name, model in (("plain", plain), ("fused", fused)):
        losses[name] = model(ids, targets, looped=True)
        losses[name].backward()
    grads = {n: rel_err(pf.grad, pp.grad)
             for (n, pp), (_, pf) in zip(plain.named_parameters(), fused.named_parameters())}
    return dict(loss_rel=abs(losses["fused"].item() / losses["plain"].item() - 1), grad_rel_max=max(grads.values()),
                worst_param=max(grads, key=grads.get), loss=losses["plain"].item())


def hessian_case():
    """GPTQ Hessians of the fused model: same keys as the plain model's and the same values."""
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "train_000.bin"
        tg.write_shard(shard, np.random.default_rng(0).integers(0, 64, 4000))
        cfg, plain, fused = gpt_pair(gptq_calibration_batches=1)
        rt = tg.Runtime(device=torch.device("cpu"))
        batch = tg.TrainLoader(cfg, rt, [str(shard)]).next_batch()
        h_plain, h_fused = (tg.collect_hessians(rt, m, [batch], False) for m in (plain, fused))
    common = sorted(set(h_plain) & set(h_fused))
    return dict(missing=sorted(set(h_plain) ^ set(h_fused)), n_keys=len(common),
                mlp_fc_keys=sum(k.endswith("mlp.fc.weight") for k in common),
                rel_max=max(rel_err(h_fused[k], h_plain[k]) for k in common))


def packed_case():
    """The frontier's packed self-extracting copy (exec'd source) can define the kernels (@triton.jit reads
    their source)."""
    switches = tg.pack_switches(tg.load_config({"PRESET": "frontier"}))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "packed_train_gpt.py"
        path.write_text(tg.pack_source((ROOT / "train_gpt.py").read_text(encoding="utf-8"), switches),
                        encoding="utf-8")
        packed = {"__name__": "packed_train_gpt", "__file__": str(path)}
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), packed)
    gen = torch.Generator().manual_seed(5)
    z, targets = torch.randn(16, 70, generator=gen) * 4, torch.randint(0, 70, (16,), generator=gen)
    x, w = torch.randn(40, 32, generator=gen), torch.randn(48, 32, generator=gen)
    return dict(has_triton=packed["triton"] is not None,
                nll_rel=rel_err(packed["softcapped_nll"](z, targets, CAP, "triton"),
                                tg.softcapped_ce_reference(z, targets, CAP)),
                act_rel=rel_err(packed["FusedLeakyReluSquare"].apply(x, w), F.leaky_relu(x @ w.t(), 0.5).square()))


def main():
    """Run every case and print the results as JSON."""
    torch.set_num_threads(1)
    results = dict(
        ce_fp32_one_tile=ce_case(96, 300, 4.0, torch.float32, 4096, 0),
        ce_fp32_three_tiles=ce_case(96, 300, 4.0, torch.float32, 128, 1),
        ce_fp32_saturated=ce_case(64, 300, 400.0, torch.float32, 128, 2),
        ce_bf16=ce_case(64, 300, 4.0, torch.bfloat16, 128, 3),
        mlp_fp32=mlp_case(100, 48, 80, torch.float32, 0),
        mlp_fp16=mlp_case(64, 64, 96, torch.float16, 1),
        gpt=gpt_case(),
        hessians=hessian_case(),
        packed=packed_case(),
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
