"""Compression study for train_gpt.py's quantised weights: every number in bench/results/codec_study.md.

  python3 bench/codec_study.py --artifact logs/smoke_model.int6.ptz      # real tensors from an artifact
  python3 bench/codec_study.py --synthetic [--layers 11]                 # record-shaped synthetic tensors

Prints (1) per-group entropy bounds and per-group codec rates in bits/value, (2) whole-artifact schemes:
bytes, bytes vs the current scheme (one blob, byte_shuffle stride 2, brotli 11), compress s, decompress s.
Times are wall seconds on this machine, one process; optional codecs that are not installed are reported.
"""
import argparse
import bz2
import lzma
import math
import os
import platform
import sys
import time
from importlib.metadata import version as pkg_version
from pathlib import Path

import brotli
import numpy as np
import torch
import zstandard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import train_gpt as tg  # noqa: E402
import weight_codec as wc  # noqa: E402

try:
    import zpaq
except ImportError as e:  # reported in the table
    zpaq, ZPAQ_ERR = None, str(e)
try:
    import pyppmd
except ImportError as e:
    pyppmd, PPMD_ERR = None, str(e)


# ----------------------------------------------------------------------------------- data
def record_shapes(layers=11, dim=512, kv_dim=256, mlp=2048, vocab=8192):
    """[(name, rows, cols, bits, clip)] of the record model's quantised tensors."""
    out = [("tok_emb.weight", vocab, dim, 8, 20.0)]
    for i in range(layers):
        out += [(f"blocks.{i}.attn.c_q.weight", dim, dim, 6, 12.85), (f"blocks.{i}.attn.c_k.weight", kv_dim, dim, 6, 12.85),
                (f"blocks.{i}.attn.c_v.weight", kv_dim, dim, 6, 12.85), (f"blocks.{i}.attn.proj.weight", dim, dim, 6, 12.85),
                (f"blocks.{i}.mlp.fc.weight", mlp, dim, 6, 12.85), (f"blocks.{i}.mlp.proj.weight", dim, mlp, 6, 12.85)]
    return out


def synthetic_weight(rows, cols, seed, rank=32, lowrank_frac=0.25, df=5.0):
    """Correlated float matrix: rank-32 part (25 % of variance) + Student-t(5) noise, per-row scales
    log-normal(0.3) and per-column scales log-normal(0.15)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) / math.sqrt(rank)
    noise = torch.distributions.StudentT(torch.tensor(df)).sample((rows, cols)) / math.sqrt(df / (df - 2))
    w = math.sqrt(lowrank_frac) * low + math.sqrt(1 - lowrank_frac) * noise
    return w * torch.exp(0.3 * torch.randn(rows, 1, generator=g)) * torch.exp(0.15 * torch.randn(1, cols, generator=g))


def synthetic_entries(layers=11):
    """Record-shaped entries quantised with train_gpt's SDClip + round-to-nearest (no GPTQ), plus the
    record's small fp16 tensors (norm scales, gains) so the 'rest' stream is realistic in kind."""
    torch.manual_seed(1234)
    entries = []
    for k, (name, rows, cols, bits, clip) in enumerate(record_shapes(layers)):
        w = synthetic_weight(rows, cols, seed=k)
        s = tg.sdclip_scales(w, bits, clip)
        entries.append({"name": name, "kind": "gptq", "shape": [rows, cols], "dtype": "float32", "bits": bits,
                        "q": tg.quantize_rtn(w, s, bits), "scale": s.half()})
        if name.endswith("mlp.proj.weight"):
            i = name.split(".")[1]
            for small, shape in (("attn_scale", [512]), ("mlp_scale", [512]), ("resid_mix", [2, 512]),
                                 ("attn.q_gain", [8])):
                entries.append({"name": f"blocks.{i}.{small}", "kind": "passthrough", "shape": shape,
                                "dtype": "float32", "data": (1 + 0.1 * torch.randn(shape)).half()})
    return entries, {"synthetic": True, "num_layers": layers}


# ------------------------------------------------------------------------------ entropy
def kt_bits(counts, alpha):
    """Code length (bits) of an adaptive Dirichlet(alpha) counting model per context row: depends only on the
    final counts, and is what an adaptive arithmetic coder with that model achieves (+ a few bytes)."""
    c = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    a = c.shape[-1]
    n = c.sum(-1)
    b = torch.lgamma(n + a * alpha) - math.lgamma(a * alpha) - (torch.lgamma(c + alpha) - math.lgamma(alpha)).sum(-1)
    return float(b.sum()) / math.log(2)


def empirical_bits(counts):
    """Sum over contexts of n * H(empirical distribution): the static bound, model cost not included."""
    c = np.asarray(counts, dtype=np.float64)
    p = np.where(c > 0, c / np.maximum(c.sum(-1, keepdims=True), 1), 1.0)
    return float(-(c * np.log2(p)).sum())


def ctx_counts(ctx, sym, k, a):
    return np.bincount((ctx * a + sym).ravel(), minlength=k * a).reshape(k, a)


def entropy_row(q, bits, sorted_q):
    """Bits/value: H0 (static), adaptive order 0, adaptive order 1 on the left / above (unsorted) / above in
    the greedily sorted order (context clipped to +-4), and 8 column classes (3 bits/column side info)."""
    qmax = 2 ** (bits - 1) - 1
    a, n = 2 * qmax + 1, q.size
    s = q.astype(np.int64) + qmax
    alpha = 0.5 if bits <= 6 else 0.1
    c0 = np.bincount(s.ravel(), minlength=a)
    out = {"H0": empirical_bits(c0) / n, "adapt0": kt_bits(c0[None], alpha) / n}

    def cond(ctx_src, sym):
        ctx = np.clip(ctx_src.astype(np.int64), -4, 4) + 4
        return kt_bits(ctx_counts(ctx, sym, 9, a), alpha)

    out["adapt|left"] = (cond(q[:, :-1], s[:, 1:]) + kt_bits(np.bincount(s[:, 0], minlength=a)[None], alpha)) / n
    out["adapt|above"] = (cond(q[:-1], s[1:]) + kt_bits(np.bincount(s[0], minlength=a)[None], alpha)) / n
    ss = sorted_q.astype(np.int64) + qmax
    out["adapt|above,sorted"] = (cond(sorted_q[:-1], ss[1:]) + kt_bits(np.bincount(ss[0], minlength=a)[None], alpha)
                                 + 16 * q.shape[0]) / n
    cls = wc.column_classes(q).astype(np.int64)
    out["adapt|col8"] = (kt_bits(ctx_counts(np.broadcast_to(cls, s.shape), s, 8, a), alpha) + 3 * q.shape[1]) / n
    return out


# --------------------------------------------------------------------------- transforms
def t_offset(q, bits):
    return (q.astype(np.int16) + 2 ** (bits - 1) - 1).astype(np.uint8)


def pack3(u):
    """4 six-bit values (0..63) -> 3 bytes; length padded to a multiple of 4 with zeros."""
    v = np.concatenate([u.ravel(), np.zeros((-u.size) % 4, np.uint8)]).reshape(-1, 4).astype(np.uint32)
    w = v[:, 0] | (v[:, 1] << 6) | (v[:, 2] << 12) | (v[:, 3] << 18)
    return np.stack([w & 255, (w >> 8) & 255, w >> 16], 1).astype(np.uint8).tobytes()


def unpack3(b, n):
    w = np.frombuffer(b, np.uint8).reshape(-1, 3).astype(np.uint32)
    w = w[:, 0] | (w[:, 1] << 8) | (w[:, 2] << 16)
    return np.stack([(w >> (6 * i)) & 63 for i in range(4)], 1).astype(np.uint8).ravel()[:n]


def transform(q, bits, name, perms=None):
    """Group int matrix -> bytes for a generic byte codec. Names: tc (two's complement), off (offset
    binary v+Q), shuf2 (off, byte_shuffle stride 2), pack3 (off, 4 int6 in 3 bytes), T (off, transposed),
    sort (off, rows sorted within each member), delta (sort, then row minus previous row mod 2**bits),
    signmag (sign bit plane packed + |v| bytes)."""
    if name == "tc":
        return q.astype(np.int8).tobytes()
    u = t_offset(q, bits)
    if name == "off":
        return u.tobytes()
    if name == "shuf2":
        return tg.byte_shuffle(u.tobytes())
    if name == "pack3":
        return pack3(u) if bits == 6 else u.tobytes()
    if name == "T":
        return np.ascontiguousarray(u.T).tobytes()
    if name in ("sort", "delta"):
        us = u[perms]
        if name == "sort":
            return us.tobytes()
        d = us.astype(np.int16)
        d[1:] -= us[:-1].astype(np.int16)
        return (d % (1 << bits)).astype(np.uint8).tobytes()
    if name == "signmag":
        return np.packbits(q < 0).tobytes() + np.abs(q.astype(np.int16)).astype(np.uint8).tobytes()
    raise ValueError(name)


def untransform(b, bits, name, shape, inv=None):
    """Inverse of transform (returns int8 matrix)."""
    qmax = 2 ** (bits - 1) - 1
    n = shape[0] * shape[1]
    if name == "tc":
        return np.frombuffer(b, np.int8).reshape(shape)
    if name == "signmag":
        nb = (n + 7) // 8
        neg = np.unpackbits(np.frombuffer(b[:nb], np.uint8))[:n].astype(bool)
        mag = np.frombuffer(b[nb:], np.uint8).astype(np.int16)
        return np.where(neg, -mag, mag).astype(np.int8).reshape(shape)
    if name == "shuf2":
        u = np.frombuffer(tg.byte_unshuffle(b), np.uint8).reshape(shape)
    elif name == "pack3" and bits == 6:
        u = unpack3(b, n).reshape(shape)
    elif name == "T":
        u = np.frombuffer(b, np.uint8).reshape(shape[::-1]).T
    elif name in ("sort", "delta"):
        us = np.frombuffer(b, np.uint8).reshape(shape)
        if name == "delta":
            us = (np.cumsum(us.astype(np.int64), 0) % (1 << bits)).astype(np.uint8)
        u = us[inv]
    else:
        u = np.frombuffer(b, np.uint8).reshape(shape)
    return (u.astype(np.int16) - qmax).astype(np.int8)


# ------------------------------------------------------------------------------- codecs
def lzma_raw(lc, lp, pb):
    filt = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": lc, "lp": lp, "pb": pb}]
    return (lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=filt),
            lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=filt))


def byte_codecs():
    """{name: (compress, decompress) or error string} for the generic byte codecs."""
    zc = {"brotli11": (lambda b: brotli.compress(b, quality=11), brotli.decompress),
          "brotli11w24": (lambda b: brotli.compress(b, quality=11, lgwin=24), brotli.decompress),
          "zstd22": (lambda b: zstandard.ZstdCompressor(level=22).compress(b),
                     lambda b: zstandard.ZstdDecompressor().decompress(b)),
          "zstd22long": (lambda b: zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters
                                                            .from_level(22, window_log=27, enable_ldm=True)).compress(b),
                         lambda b: zstandard.ZstdDecompressor(max_window_size=1 << 27).decompress(b)),
          "xz9e": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
          "lzma_raw_lc0lp0pb0": lzma_raw(0, 0, 0),
          "lzma_raw_lc4lp0pb0": lzma_raw(4, 0, 0),
          "bz2_9": (lambda b: bz2.compress(b, 9), bz2.decompress)}
    for order in (2, 4, 8):
        zc[f"ppmd_o{order}"] = ((lambda b, o=order: pyppmd.compress(b, max_order=o, mem_size=256 << 20)),
                                (lambda b, o=order: pyppmd.decompress(b, max_order=o, mem_size=256 << 20))) if pyppmd else f"pyppmd not importable: {PPMD_ERR}"
    for level in (3, 4, 5):
        zc[f"zpaq{level}"] = ((lambda b, lv=level: zpaq.compress(b, level=lv, threads=1)),
                              (lambda b: zpaq.decompress(b, threads=1))) if zpaq else f"zpaq not importable: {ZPAQ_ERR}"
    return zc


def timed(fn, *a):
    t = time.perf_counter()
    r = fn(*a)
    return r, time.perf_counter() - t


# ------------------------------------------------------------------------------ schemes
def baseline(entries, arch):
    """The current artifact: serialize_entries -> byte_shuffle(2) -> brotli 11, + 48-byte header."""
    comp, dec = tg.get_compressor("brotli")
    blob = tg.serialize_entries(entries, arch)
    sh, t_sh = timed(tg.byte_shuffle, blob)
    payload, t_c = timed(comp, sh)
    _, t_d = timed(lambda p: tg.byte_unshuffle(dec(p)), payload)
    return blob, len(payload) + 48, t_sh + t_c, t_d


def grouped_matrices(entries):
    """[(key, bits, stacked int8 matrix, [member matrices])] in encode_weights' group order."""
    out = []
    for key, idx in wc.group_quantized(entries).items():
        qs = [entries[i]["q"].numpy() for i in idx]
        out.append((key, int(key.split(":")[1]), np.concatenate(qs, 0), qs))
    return out


def member_perms(qs):
    """Greedy L1 order of each member, as one stacked-row permutation; plus seconds spent."""
    t = time.perf_counter()
    perms, off = [], 0
    for q in qs:
        perms.append(wc.greedy_row_order(q) + off)
        off += q.shape[0]
    return np.concatenate(perms), time.perf_counter() - t


def run(entries, arch, label, quick, out, prototype_only=False):
    def say(s=""):
        print(s, flush=True)
        out.append(s)

    say(f"## {label}")
    say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}, brotli {brotli.__version__}, zstandard {zstandard.__version__}, "
        f"zpaq {pkg_version('zpaq') if zpaq else 'n/a'}, pyppmd {pkg_version('pyppmd') if pyppmd else 'n/a'}, torch threads "
        f"{torch.get_num_threads()}")
    blob, base_bytes, base_c, base_d = baseline(entries, arch)
    groups = grouped_matrices(entries)
    nvals = sum(g[2].size for g in groups)
    say(f"quantised values: {nvals:,}; uncompressed blob {len(blob):,} bytes; current scheme {base_bytes:,} bytes "
        f"({8 * base_bytes / nvals:.4f} bits/value incl. scales+fp16+table)")
    # rest = everything but the grouped int values: the brotli directory of encode_weights with stored groups
    store = wc.encode_weights(entries, arch, codecs=(wc.CODEC_STORE,))
    rest_bytes = len(store) - nvals
    _, rest_d = timed(wc.decode_weights, store)
    say(f"rest (tensor table, fp16 scales, passthrough, group directory; brotli 11): {rest_bytes:,} bytes")
    fp16 = b"".join((e["scale"] if e["kind"] == "gptq" else e["data"]).to(torch.float16).numpy().tobytes()
                    for e in entries)
    say(f"fp16 scales+passthrough {len(fp16):,} raw bytes: brotli 11 {len(brotli.compress(fp16, quality=11)):,}, "
        f"byte planes split then brotli 11 {len(brotli.compress(wc.split_planes(fp16), quality=11)):,}")
    perms = {}
    sort_t = {}
    for key, bits, q, qs in groups:
        perms[key], sort_t[key] = member_perms(qs)
    t2048 = [timed(wc.greedy_row_order, q)[1] for _, _, _, qs in groups for q in qs if q.shape == (2048, 512)][:1]
    say(f"greedy L1 row sort: {sum(sort_t.values()):.1f} s for all members"
        + (f"; one 2048x512 member {t2048[0]:.2f} s" if t2048 else ""))

    say("\n### Entropy bounds per group (bits/value)\n")
    cols = ["H0", "adapt0", "adapt|left", "adapt|above", "adapt|above,sorted", "adapt|col8"]
    say("| group | shape | " + " | ".join(cols) + " |")
    say("|---|---|" + "---|" * len(cols))
    for key, bits, q, qs in groups:
        e = entropy_row(q, bits, q[perms[key]])
        say(f"| {key} | {q.shape[0]}x{q.shape[1]} | " + " | ".join(f"{e[c]:.4f}" for c in cols) + " |")

    codecs = byte_codecs()
    results = []  # (scheme, bytes, compress s, decompress s, per-group bits)

    def add(name, total, tc, td, per):
        results.append((name, total, tc, td, per))
        say(f"  {name}: {total:,} bytes ({100 * (total / base_bytes - 1):+.2f} %), {tc:.1f} s / {td:.1f} s")

    say("\n### Schemes (running log)\n")
    results.append(("current: blob + shuffle2 + brotli11 (baseline)", base_bytes, base_c, base_d, None))
    # whole-blob alternatives (one stream, the current serialisation)
    whole = ["brotli11w24", "zstd22", "zstd22long", "xz9e", "bz2_9", "ppmd_o2", "zpaq3", "zpaq4", "zpaq5"]
    if quick:
        whole = ["zstd22", "xz9e", "zpaq5"]
    if prototype_only:
        whole = []
    for shuf in (True, False) if not (quick or prototype_only) else (True,):
        src = tg.byte_shuffle(blob) if shuf else blob
        for cname in (["brotli11"] if not shuf else []) + (whole if shuf else []):
            c = codecs[cname]
            if isinstance(c, str):
                say(f"  blob {cname}: NOT RUN ({c})")
                continue
            p, tc = timed(c[0], src)
            r, td = timed(c[1], p)
            assert r == src
            add(f"blob{' + shuffle2' if shuf else ''} + {cname}", len(p) + 48, tc, td, None)
    # per-group generic codecs with transforms; rest with brotli
    combos = [("brotli11w24", t) for t in ("off", "tc", "shuf2", "pack3", "T", "sort", "delta", "signmag")]
    combos += [(c, "off") for c in ("zstd22", "xz9e", "lzma_raw_lc0lp0pb0", "lzma_raw_lc4lp0pb0", "bz2_9",
                                    "ppmd_o2", "ppmd_o4", "ppmd_o8", "zpaq3", "zpaq4", "zpaq5")]
    combos += [("zpaq5", t) for t in ("pack3", "sort", "delta", "T")] + [("ppmd_o2", "sort"), ("xz9e", "pack3")]
    if quick:
        combos = [("brotli11w24", "off"), ("brotli11w24", "shuf2"), ("brotli11w24", "pack3"), ("brotli11w24", "sort"),
                  ("xz9e", "off"), ("lzma_raw_lc0lp0pb0", "off"), ("ppmd_o2", "off"), ("zpaq5", "off"),
                  ("zpaq5", "sort")]
    for cname, tname in ([] if prototype_only else combos):
        c = codecs[cname]
        if isinstance(c, str):
            say(f"  groups {cname}[{tname}]: NOT RUN ({c})")
            continue
        total, tc, td, per, failed = rest_bytes, 0.0, rest_d, {}, None
        for key, bits, q, qs in groups:
            inv = wc.invert_permutation(perms[key]) if tname in ("sort", "delta") else None
            data, t0 = timed(transform, q, bits, tname, perms[key])
            p, t1 = timed(c[0], data)
            try:
                back, t2 = timed(lambda b: untransform(c[1](b), bits, tname, q.shape, inv), p)
                if not np.array_equal(back, q):
                    raise ValueError("round trip differs")
            except Exception as e:  # a codec that cannot decode its own output is reported, not hidden
                failed = f"{key}: {type(e).__name__}: {e}"
                break
            extra = 2 * q.shape[0] if tname in ("sort", "delta") else 0
            total += len(p) + extra
            tc += t0 + t1 + (sort_t[key] if extra else 0)
            td += t2
            per[key] = 8 * (len(p) + extra) / q.size
        if failed:
            say(f"  groups + {cname}[{tname}]: FAILED to round-trip ({failed})")
            results.append((f"groups + {cname}[{tname}]: FAILED round trip ({failed})", 0, 0, 0, None))
            continue
        add(f"groups + {cname}[{tname}]", total, tc, td, per)
    # the prototype: numpy rANS per group (exact container, round trip checked)
    protos = [("rANS order0", (wc.CODEC_RANS0,), ()), ("rANS col8", (wc.CODEC_RANS_COLS,), ()),
              ("rANS above (unsorted)", (wc.CODEC_RANS_ABOVE,), ()),
              ("rANS above, rows sorted (kept where smaller)", (wc.CODEC_RANS_ABOVE,), tuple(wc.ROLES.values())),
              ("rANS pred (unsorted)", (wc.CODEC_RANS_PRED,), ()),
              ("auto, no sorting", wc.AUTO_CODECS, ()),
              ("auto + brotli per group, embed sorted if smaller", (wc.CODEC_BROTLI,) + wc.AUTO_CODECS, wc.SORT_ROLES),
              ("auto, embed sorted if smaller (PROTOTYPE DEFAULT)", wc.AUTO_CODECS, wc.SORT_ROLES)]
    if quick or prototype_only:
        protos = [p for p in protos if "brotli" not in p[0]]
    for name, cset, roles in protos:
        p, tc = timed(wc.encode_weights, entries, arch, cset, roles)
        (e2, _), td = timed(wc.decode_weights, p)
        for x, y in zip(entries, e2):
            for k in ("q", "scale", "data"):
                if k in x:
                    assert torch.equal(x[k].to(y[k].dtype), y[k]), (name, x["name"], k)
        add(f"groups + {name}", len(p) + 48, tc, td, None)

    names = {wc.CODEC_RANS0: "order0", wc.CODEC_RANS_COLS: "col8", wc.CODEC_RANS_ABOVE: "above",
             wc.CODEC_RANS_PRED: "pred"}
    for codec, label in names.items():
        for sort in (False, True):
            if sort and codec in (wc.CODEC_RANS0, wc.CODEC_RANS_COLS):
                continue  # order-free models: sorting only adds the permutation
            per = {}
            for key, bits, q, qs in groups:
                src = q[perms[key]] if sort else q
                per[key] = 8 * (len(wc.encode_ints(src, bits, codec)) + (2 * q.shape[0] if sort else 0)) / q.size
            results.append((f"group stream only: rANS {label}{' [sort]' if sort else ''}", None, 0, 0, per))
    say("\n### Whole artifact (weights payload + 48-byte header; code not included)\n")
    say("| scheme | bytes | vs current | compress s | decompress s |")
    say("|---|---:|---:|---:|---:|")
    for name, total, tc, td, _ in sorted((r for r in results if r[1] is not None), key=lambda r: r[1]):
        if not total:
            say(f"| {name} | - | - | - | - |")
            continue
        say(f"| {name} | {total:,} | {total - base_bytes:+,} ({100 * (total / base_bytes - 1):+.2f} %) | {tc:.1f} | {td:.1f} |")
    say("\n### Per-group bits/value (stream incl. its model and side info; [sort] includes the 2-byte/row permutation)\n")
    keys = [g[0] for g in groups]
    say("| scheme | " + " | ".join(keys) + " |")
    say("|---|" + "---:|" * len(keys))
    for name, _total, _tc, _td, per in results:
        if per:
            say(f"| {name} | " + " | ".join(f"{per[k]:.4f}" for k in keys) + " |")
    say("")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", action="append", default=[], help="train_gpt artifact (.ptz); repeatable")
    ap.add_argument("--synthetic", action="store_true", help="record-shaped synthetic tensors")
    ap.add_argument("--layers", type=int, default=11, help="synthetic: number of layers (record: 11)")
    ap.add_argument("--quick", action="store_true", help="fewer schemes (for record-size data)")
    ap.add_argument("--prototype-only", action="store_true",
                    help="only the current scheme and the rANS prototype rows (skip the generic codecs)")
    ap.add_argument("--out", help="also write the printed tables to this file")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = []
    for path in a.artifact:
        entries, arch = tg.read_artifact(path)
        run(entries, arch, f"real tensors: {path} ({os.path.getsize(path):,} bytes on disk)", a.quick, out,
            a.prototype_only)
    if a.synthetic:
        entries, arch = synthetic_entries(a.layers)
        run(entries, arch, f"synthetic record-shaped tensors, {a.layers} layers", a.quick, out, a.prototype_only)
    if a.out:
        Path(a.out).write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
