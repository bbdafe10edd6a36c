"""CPU benchmark of train_gpt.py hot paths, optionally against an earlier git revision (ratio printed).

Usage: python3 bench/bench_cpu.py [--against REV] [--repeats N]
Measures, on the smoke-sized model with synthetic tokens: training step throughput (tokens/s),
eval scoring throughput (tokens/s through token_nll), and GPTQ time for one 512x512 matrix.
Not a test: numbers depend on the machine; compare only runs made back to back on the same machine.
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_module(path, name):
    """Import a train_gpt.py file from `path` as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def best_of(fn, repeats):
    """Minimum wall seconds of `repeats` calls of fn (after one warmup call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench(tg, repeats):
    """{metric: value} for one train_gpt module."""
    torch.manual_seed(0)
    cfg = tg.Hyperparameters(**dict(tg.SMOKE_PRESET, preset="smoke"))
    rt = tg.Runtime(device=torch.device("cpu"))
    model = tg.build_model(cfg, rt)
    trainer = tg.Trainer(cfg, rt, model)
    seqs = cfg.train_batch_tokens // cfg.train_seq_len // cfg.grad_accum_base
    x = torch.randint(0, cfg.vocab_size, (seqs, cfg.train_seq_len))
    micro = [(x, torch.roll(x, -1, 1))] * cfg.grad_accum_base
    step_s = best_of(lambda: trainer.step(micro, 10, 1.0, True), repeats)
    xe = torch.randint(0, cfg.vocab_size, (cfg.eval_batch_seqs, cfg.eval_seq_len))
    with torch.no_grad():
        eval_s = best_of(lambda: model.token_nll(xe, xe, True), repeats)
    W = torch.randn(512, 512)
    X = torch.randn(4096, 512) @ torch.randn(512, 512) * 0.1
    H = X.T @ X
    gptq_s = best_of(lambda: tg.gptq_quantize(W, H, 6, 12.85), max(1, repeats // 2))
    return {"train tok/s": cfg.train_batch_tokens / step_s, "eval tok/s": xe.numel() / eval_s,
            "gptq 512x512 s": gptq_s}


def main():
    """Run the benchmark for the working tree and optionally for --against REV, interleaved round by round
    (so machine load drifts hit both alike); each metric keeps its best round."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="git revision whose train_gpt.py to compare with")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    modules = {"current": load_module(ROOT / "train_gpt.py", "tg_current")}
    tmp = tempfile.TemporaryDirectory()
    if args.against:
        src = subprocess.run(["git", "show", f"{args.against}:train_gpt.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        path = Path(tmp.name) / "train_gpt_prev.py"
        path.write_text(src)
        modules[args.against] = load_module(path, "tg_prev")
    rows = {}
    for _ in range(args.rounds):
        for name, mod in modules.items():
            row = bench(mod, args.repeats)
            best = rows.setdefault(name, row)
            for k, v in row.items():  # throughputs: higher is better; seconds: lower is better
                best[k] = max(best[k], v) if "tok/s" in k else min(best[k], v)
    for name, row in rows.items():
        print(f"{name:>12}: " + "  ".join(f"{k}={v:,.3f}" for k, v in row.items()))
    if args.against:
        current, prev = rows["current"], rows[args.against]
        print("       ratio: " + "  ".join(f"{k}={current[k] / prev[k]:.3f}x" for k in current))


if __name__ == "__main__":
    main()
