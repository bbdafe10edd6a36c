"""Per-group rANS compression vs brotli-11 on record-shaped quantised tensors (bytes and seconds).

Usage: python3 bench/bench_pergroup.py [--artifact PATH] [--layers 11]
Without --artifact it builds synthetic record-shaped tensors (11 layers x 512, vocab 8192): correlated
Gaussian rows quantised with the script's own SDClip rule (int6 at 12.85 sigmas, int8 embedding at 20), fp16
scales; with --artifact it re-encodes a real artifact's entries. Not a test: times depend on the machine.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def synthetic_entries(layers, seed=0):
    """Record-shaped GPTQ-like entries: rows = low-rank structure + noise, SDClip scales, RTN integers."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"attn.c_q.weight": (512, 512), "attn.c_k.weight": (256, 512), "attn.c_v.weight": (256, 512),
              "attn.proj.weight": (512, 512), "mlp.fc.weight": (2048, 512), "mlp.proj.weight": (512, 2048)}
    entries = []
    named = [(f"blocks.{i}.{k}", s, 6, 12.85) for i in range(layers) for k, s in shapes.items()]
    for name, (r, c), bits, clip in named + [("tok_emb.weight", (8192, 512), 8, 20.0)]:
        W = torch.randn(r, c, generator=gen) + 0.3 * torch.randn(r, 8, generator=gen) @ torch.randn(8, c, generator=gen)
        W *= torch.rand(r, 1, generator=gen) + 0.5
        s = tg.sdclip_scales(W, bits, clip)
        entries.append(dict(name=name, kind="gptq", shape=[r, c], dtype="float32", bits=bits,
                            q=tg.quantize_rtn(W, s, bits), scale=s.half()))
    return entries


def main():
    """Print bytes and seconds of both encodings and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact")
    ap.add_argument("--layers", type=int, default=11)
    args = ap.parse_args()
    entries, arch = tg.read_artifact(args.artifact) if args.artifact else (synthetic_entries(args.layers), {})
    n = sum(e["q"].numel() for e in entries if "q" in e)
    rows = {}
    for name in ("brotli", "pergroup"):
        t = time.perf_counter()
        data = tg.encode_artifact(entries, arch, name)
        enc = time.perf_counter() - t
        path = Path("/tmp") / f"bench_pergroup.{name}.ptz"
        path.write_bytes(data)
        t = time.perf_counter()
        tg.read_artifact(path)
        rows[name] = (len(data), enc, time.perf_counter() - t)
        path.unlink()
    print(f"{n / 1e6:.1f}M quantised values ({'artifact ' + args.artifact if args.artifact else 'synthetic record-shaped'})")
    for name, (size, enc, dec) in rows.items():
        print(f"{name:>9}: {size:>11,} bytes  encode {enc:6.1f}s  decode {dec:5.1f}s")
    b, p = rows["brotli"][0], rows["pergroup"][0]
    print(f"pergroup - brotli = {p - b:+,} bytes ({100 * (p - b) / b:+.2f} %)")


if __name__ == "__main__":
    main()
