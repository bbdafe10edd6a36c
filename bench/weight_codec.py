"""Prototype per-group weight codec for train_gpt.py's EXPORT section (numpy only, no new dependency).

Payload = b"PGQG" | u8 version | u32 directory length | u32 crc32(directory) | brotli(directory) | group streams.
The directory is b"PGQT"-style JSON + raw bytes: the tensor table (everything except the grouped int values),
each group's members, permutation, codec id, stream length and crc32 of its int values; the fp16 scales and
passthrough tensors ride in the same brotli stream. Each group's int values (rows of all members stacked,
optionally reordered by a greedy L1 row sort) are coded by an interleaved rANS coder whose static model is
P(value | value in the row above), the count table shipped in the directory.
Python 3.10 compatible; functions are self-contained so they can be pasted into train_gpt.py.
"""
import json
import re
import struct
import zlib

import brotli
import numpy as np
import torch

GROUP_MAGIC = b"PGQG"
GROUP_VERSION = 1
CODEC_STORE, CODEC_BROTLI, CODEC_RANS0, CODEC_RANS_COLS, CODEC_RANS_ABOVE, CODEC_RANS_PRED = 0, 1, 2, 3, 4, 5
COL_CLASSES = 8         # CODEC_RANS_COLS: columns binned into 8 classes by their std, one model per class
AUTO_CODECS = (CODEC_RANS0, CODEC_RANS_COLS, CODEC_RANS_ABOVE, CODEC_RANS_PRED)  # per group the smallest wins
SORT_ROLES = ("embed",)  # groups also tried with greedy-sorted rows (the smaller is kept)
ABOVE_CLIP = 4          # CODEC_RANS_ABOVE: context = value in the row above, clipped to +-4
RANS_PREC = 16          # model frequencies sum to 2**16
RANS_LOW = 1 << 16      # rANS state interval [2**16, 2**32), 16-bit renormalisation words
RANS_LANES = 256        # interleaved rANS lanes (each ends with a 4-byte state)
ROLES = {"attn.c_q.weight": "attn_qo", "attn.proj.weight": "attn_qo", "attn.c_k.weight": "attn_kv",
         "attn.c_v.weight": "attn_kv", "mlp.fc.weight": "mlp_up", "mlp.proj.weight": "mlp_down",
         "tok_emb.weight": "embed"}


class CodecError(ValueError):
    """A group payload is truncated, corrupted or of an unknown format."""


def tensor_role(name):
    """Role of a tensor from its state-dict name ('blocks.3.attn.c_q.weight' -> 'attn_qo'); unknown names
    map to the name with the layer index removed."""
    base = re.sub(r"^blocks\.\d+\.", "", name)
    return ROLES.get(base, base)


def group_quantized(entries):
    """{group key: [entry index, ...]} for gptq entries, keyed 'role:bits:cols' so members stack by rows."""
    groups = {}
    for i, e in enumerate(entries):
        if e["kind"] == "gptq":
            key = f"{tensor_role(e['name'])}:{e['bits']}:{e['shape'][1]}"
            groups.setdefault(key, []).append(i)
    return groups


def greedy_row_order(q):
    """Permutation (int64, len rows) visiting rows by greedy L1 nearest neighbour from the row with the most
    non-zeros (lowest index on ties); deterministic."""
    x = torch.from_numpy(np.ascontiguousarray(q)).to(torch.float32)
    n = x.shape[0]
    dist = torch.cdist(x, x, p=1.0)
    dist.fill_diagonal_(float("inf"))
    cur = int(torch.argmax((x != 0).sum(1)))
    order = [cur]
    dist[:, cur] = float("inf")
    for _ in range(n - 1):
        cur = int(torch.argmin(dist[cur]))
        order.append(cur)
        dist[:, cur] = float("inf")
    return np.asarray(order, dtype=np.int64)


def invert_permutation(perm):
    """inv with inv[perm[i]] = i, so x[perm][inv] == x."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=perm.dtype)
    return inv


def encode_permutation(perm):
    """Permutation as little-endian uint16 (uint32 if > 65536 rows)."""
    return perm.astype("<u2" if perm.size <= 65536 else "<u4").tobytes()


def decode_permutation(data, n):
    """Inverse of encode_permutation for n rows; CodecError unless it is a permutation of range(n)."""
    dt = "<u2" if n <= 65536 else "<u4"
    if len(data) != n * np.dtype(dt).itemsize:
        raise CodecError("permutation has the wrong length")
    perm = np.frombuffer(data, dtype=dt).astype(np.int64)
    if not np.array_equal(np.sort(perm), np.arange(n)):
        raise CodecError("permutation is not a permutation")
    return perm


def normalize_freqs(counts, prec=RANS_PREC):
    """(K, A) counts -> (K, A) int64 frequencies summing to exactly 2**prec per row: >= 1 where the count is
    > 0, 0 where it is 0 (an all-zero row gets all its mass on symbol 0)."""
    counts = np.asarray(counts, dtype=np.int64)
    k, a = counts.shape
    total = 1 << prec
    if a > total // 2:
        raise CodecError("alphabet too large for the rANS precision")
    n = counts.sum(1, keepdims=True)
    f = np.where(counts > 0, np.maximum(1, (counts * total) // np.maximum(n, 1)), 0)
    f[n[:, 0] == 0, 0] = total
    big = np.argmax(f, 1)
    f[np.arange(k), big] += total - f.sum(1)
    bad = f[np.arange(k), big] < 1  # pathological rows: fall back to 1 + proportional share for every symbol
    f[bad] = 1 + (counts[bad] * (total - a)) // np.maximum(n[bad], 1)
    f[bad, np.argmax(counts[bad], 1)] += total - f[bad].sum(1)
    return f


def _cum(freqs):
    """Exclusive cumulative frequencies per row (the rANS slot start of each symbol)."""
    return np.concatenate([np.zeros((freqs.shape[0], 1), np.int64), np.cumsum(freqs, 1)[:, :-1]], 1)


def rans_encode(sym, ctx, freqs, prec=RANS_PREC):
    """Interleaved rANS: sym, ctx (T steps, L lanes) ints; lane l at step t coded with freqs[ctx[t, l]].
    Returns final states (L x u32) + renormalisation words (u16) in decode order."""
    steps, lanes = sym.shape
    cum = _cum(freqs)
    x = np.full(lanes, RANS_LOW, dtype=np.uint64)
    chunks = [b""] * steps
    shift = np.uint64(32 - prec)
    for t in range(steps - 1, -1, -1):
        f = freqs[ctx[t], sym[t]].astype(np.uint64)
        c = cum[ctx[t], sym[t]].astype(np.uint64)
        m = x >= (f << shift)
        chunks[t] = (x[m] & np.uint64(0xFFFF)).astype("<u2").tobytes()
        x[m] >>= np.uint64(16)
        x = ((x // f) << np.uint64(prec)) + (x % f) + c
    return x.astype("<u4").tobytes() + b"".join(chunks)


def rans_decode(data, steps, lanes, freqs, ctx, ctx_of_prev=None, lag=1, prec=RANS_PREC):
    """Inverse of rans_encode -> sym (T, L) (uint8; uint16 if the alphabet is > 256). Contexts: ctx[t] if ctx
    is (T, L); else, with ctx_of_prev, ctx (L,) for t < lag and ctx_of_prev[sym[t-lag]] after; else ctx (L,)
    throughout. CodecError if the stream is truncated or does not end in the encoder's start state."""
    k, a = freqs.shape
    if len(data) < 4 * lanes or (len(data) - 4 * lanes) % 2:
        raise CodecError("rANS stream truncated")
    sym_dtype = np.uint8 if a <= 256 else np.uint16
    lut = np.stack([np.repeat(np.arange(a, dtype=sym_dtype), freqs[i]) for i in range(k)])
    x = np.frombuffer(data, "<u4", lanes).astype(np.uint64)
    words = np.frombuffer(data, "<u2", offset=4 * lanes).astype(np.uint64)
    fu, cu = freqs.astype(np.uint64), _cum(freqs).astype(np.uint64)
    low_mask, sh = np.uint64((1 << prec) - 1), np.uint64(prec)
    out = np.empty((steps, lanes), sym_dtype)
    ctx = np.asarray(ctx, dtype=np.int64)
    per_step = ctx.ndim == 2
    start = None if per_step else np.broadcast_to(ctx, (lanes,))
    pos = 0
    for t in range(steps):
        if per_step:
            c = ctx[t]
        elif ctx_of_prev is not None and t >= lag:
            c = ctx_of_prev[out[t - lag]]
        else:
            c = start
        slot = x & low_mask
        sym = lut[c, slot.astype(np.int64)]
        out[t] = sym
        x = fu[c, sym] * (x >> sh) + slot - cu[c, sym]
        m = x < RANS_LOW
        n = int(np.count_nonzero(m))
        if n:
            if pos + n > words.size:
                raise CodecError("rANS stream truncated")
            x[m] = (x[m] << np.uint64(16)) | words[pos:pos + n]
            pos += n
    if pos != words.size or not np.all(x == RANS_LOW):
        raise CodecError("rANS stream does not end where it should (corrupted)")
    return out


def fold(cols):
    """Lane layout: a row of `cols` values is coded as `fold` consecutive steps of cols/fold lanes
    (RANS_LANES lanes when it divides, else one lane per column); few lanes = few 4-byte final states."""
    return cols // RANS_LANES if cols % RANS_LANES == 0 and cols > RANS_LANES else 1


def column_classes(q, n=COL_CLASSES):
    """Class 0..n-1 of each column by rank of its std (equal-size bins); uint8 (cols,)."""
    rank = np.argsort(np.argsort(np.asarray(q, dtype=np.float64).std(0), kind="stable"), kind="stable")
    return (rank * n // max(q.shape[1], 1)).astype(np.uint8)


def prediction_modes(s, a, iters=3):
    """CODEC_RANS_PRED: per row, 1 = code the difference to the row above, 0 = plain (row 0 always plain),
    chosen by estimated cost under the two histograms, refit `iters` times; uint8 (rows,)."""
    s = np.asarray(s, dtype=np.int64)
    rows, cols = s.shape
    diff = np.concatenate([np.zeros((1, cols), np.int64), np.diff(s, axis=0)]) + a - 1
    use0 = use1 = np.ones(rows, bool)  # first fit: both histograms from every row
    mode = np.zeros(rows, np.uint8)
    for _ in range(iters):
        p0 = np.log2(np.bincount(s[use0].ravel(), minlength=2 * a - 1) + 0.5)
        p1 = np.log2(np.bincount(diff[use1].ravel(), minlength=2 * a - 1) + 0.5)
        cost0 = (np.log2(int(use0.sum()) * cols + a) - p0[s]).sum(-1)
        cost1 = (np.log2(int(use1.sum()) * cols + a) - p1[diff]).sum(-1)
        mode = (cost1 < cost0).astype(np.uint8)
        mode[0] = 0
        use0, use1 = mode == 0, mode == 1
        if not use1.any():
            break
    return mode


def encode_ints(q, bits, codec):
    """Code an int matrix (rows, cols) with values in [-(2**(bits-1)-1), 2**(bits-1)-1] -> bytes
    (codec-specific header included); decode_ints inverts it exactly."""
    qmax = 2 ** (bits - 1) - 1
    q = np.asarray(q)
    if q.size and (q.min() < -qmax or q.max() > qmax):
        raise CodecError(f"values outside +-{qmax}")
    s = q.astype(np.int64) + qmax
    a = 2 * qmax + 1
    if codec == CODEC_STORE:
        return s.astype(np.uint8).tobytes()
    if codec == CODEC_BROTLI:
        return brotli.compress(s.astype(np.uint8).tobytes(), quality=11, lgwin=24)
    rows, cols = s.shape
    g = fold(cols)
    lanes = cols // g
    st = s.reshape(rows * g, lanes)  # step t = row * g + j holds columns j*lanes .. (j+1)*lanes-1
    side = b""
    if codec == CODEC_RANS0:
        k, ctx = 1, np.zeros_like(st)
    elif codec == CODEC_RANS_COLS:
        cls = column_classes(q)
        side = cls.tobytes()
        k, ctx = COL_CLASSES, np.tile(cls.astype(np.int64).reshape(g, lanes), (rows, 1))
    elif codec == CODEC_RANS_ABOVE:
        k = 2 * ABOVE_CLIP + 2  # last context: the first row
        ctx = np.vstack([np.full((g, lanes), k - 1), np.clip(st[:-g] - qmax, -ABOVE_CLIP, ABOVE_CLIP) + ABOVE_CLIP])
    elif codec == CODEC_RANS_PRED:
        mode = prediction_modes(s, a)
        side = np.packbits(mode).tobytes()
        ctx = np.broadcast_to(np.repeat(mode.astype(np.int64), g)[:, None], st.shape)
        st = np.where(ctx == 1, np.vstack([st[:g], st[g:] - st[:-g]]) + a - 1, st)
        k, a = 2, 2 * a - 1
    else:
        raise CodecError(f"unknown codec id {codec}")
    counts = np.bincount((ctx * a + st).ravel(), minlength=k * a).reshape(k, a)
    table = brotli.compress(side + counts.astype("<u4").tobytes(), quality=11)
    return struct.pack("<I", len(table)) + table + rans_encode(st, ctx, normalize_freqs(counts))


def decode_ints(data, rows, cols, bits, codec):
    """Inverse of encode_ints: int8 array (rows, cols); CodecError on malformed input."""
    qmax = 2 ** (bits - 1) - 1
    a = 2 * qmax + 1
    try:
        if codec in (CODEC_STORE, CODEC_BROTLI):
            raw = data if codec == CODEC_STORE else brotli.decompress(data)
            if len(raw) != rows * cols:
                raise CodecError("stored group has the wrong size")
            s = np.frombuffer(raw, np.uint8).reshape(rows, cols).astype(np.int64)
        elif codec in (CODEC_RANS0, CODEC_RANS_COLS, CODEC_RANS_ABOVE, CODEC_RANS_PRED):
            (tlen,) = struct.unpack("<I", data[:4])
            table = brotli.decompress(data[4:4 + tlen])
            g = fold(cols)
            lanes, steps = cols // g, rows * g
            ctx_of_prev, ka = None, a
            if codec == CODEC_RANS0:
                k, ctx = 1, np.zeros(lanes, np.int64)
            elif codec == CODEC_RANS_COLS:
                k = COL_CLASSES
                cls = np.frombuffer(table[:cols], np.uint8).astype(np.int64)
                if cls.size != cols or cls.max(initial=0) >= k:
                    raise CodecError("column classes are corrupted")
                table, ctx = table[cols:], np.tile(cls.reshape(g, lanes), (rows, 1))
            elif codec == CODEC_RANS_ABOVE:
                k = 2 * ABOVE_CLIP + 2
                ctx = np.full(lanes, k - 1, np.int64)
                ctx_of_prev = np.clip(np.arange(a) - qmax, -ABOVE_CLIP, ABOVE_CLIP) + ABOVE_CLIP
            else:
                nbytes = (rows + 7) // 8
                mode = np.unpackbits(np.frombuffer(table[:nbytes], np.uint8))[:rows]
                if len(table) < nbytes or mode.size != rows or mode[0]:
                    raise CodecError("prediction modes are corrupted")
                table, k, ka = table[nbytes:], 2, 2 * a - 1
                ctx = np.broadcast_to(np.repeat(mode.astype(np.int64), g)[:, None], (steps, lanes))
            counts = np.frombuffer(table, "<u4")
            if counts.size != k * ka:
                raise CodecError("rANS count table has the wrong size")
            freqs = normalize_freqs(counts.reshape(k, ka).astype(np.int64))
            st = rans_decode(data[4 + tlen:], steps, lanes, freqs, ctx, ctx_of_prev, lag=g).astype(np.int64)
            if codec == CODEC_RANS_PRED:
                for t in range(g, steps):
                    if ctx[t, 0]:
                        st[t] += st[t - g] - (a - 1)
            s = st.reshape(rows, cols)
        else:
            raise CodecError(f"unknown codec id {codec}")
    except (struct.error, brotli.error) as e:
        raise CodecError(f"group stream is corrupted ({e})") from None
    if s.size and (s.min() < 0 or s.max() > 2 * qmax):
        raise CodecError("decoded value out of range")
    return (s - qmax).astype(np.int8)


def encode_group(qs, bits, codecs=AUTO_CODECS, sort_rows=False):
    """Stack member int matrices by rows and code with the best of `codecs`; if sort_rows, also try each
    member's rows greedily sorted -> (codec id, stream bytes, concatenated member permutations or b"")."""
    codec, stream = best_stream(np.concatenate(list(qs), 0), bits, codecs)
    perm_bytes = b""
    if sort_rows:
        perms = [greedy_row_order(x) for x in qs]
        c2, s2 = best_stream(np.concatenate([x[p] for x, p in zip(qs, perms)], 0), bits, codecs)
        p2 = b"".join(encode_permutation(p) for p in perms)
        if len(s2) + len(p2) < len(stream):
            codec, stream, perm_bytes = c2, s2, p2
    return codec, stream, perm_bytes


def decode_group(stream, perm_bytes, row_counts, cols, bits, codec):
    """Inverse of encode_group: list of int8 member matrices with the given row counts."""
    qs = np.split(decode_ints(stream, sum(row_counts), cols, bits, codec), np.cumsum(row_counts)[:-1], 0)
    if not perm_bytes:
        return qs
    sizes = [2 * n if n <= 65536 else 4 * n for n in row_counts]
    if sum(sizes) != len(perm_bytes):
        raise CodecError("permutations have the wrong length")
    offs = np.cumsum([0] + sizes)
    return [q[invert_permutation(decode_permutation(perm_bytes[o:o + n], q.shape[0]))]
            for q, o, n in zip(qs, offs, sizes)]


def best_stream(q, bits, codecs=AUTO_CODECS):
    """(codec id, stream) of the smallest encoding of q among `codecs`."""
    return min(((c, encode_ints(q, bits, c)) for c in codecs), key=lambda cs: (len(cs[1]), cs[0]))


def split_planes(data):
    """Bytes at even offsets, then bytes at odd offsets (fp16 high/low bytes apart): brotli packs it better."""
    arr = np.frombuffer(data, np.uint8)
    return arr[0::2].tobytes() + arr[1::2].tobytes()


def join_planes(data):
    """Inverse of split_planes."""
    arr = np.frombuffer(data, np.uint8)
    out = np.empty(arr.size, np.uint8)
    half = (arr.size + 1) // 2
    out[0::2], out[1::2] = arr[:half], arr[half:]
    return out.tobytes()


def encode_weights(entries, arch, codecs=AUTO_CODECS, sort_roles=SORT_ROLES):
    """Quantised entries (train_gpt format) + arch dict -> payload bytes (see module docstring)."""
    groups = group_quantized(entries)
    table, raw_parts, offset = [], [], 0

    def put(b):
        """Append raw bytes to the directory; returns their [offset, length]."""
        nonlocal offset
        raw_parts.append(b)
        offset += len(b)
        return [offset - len(b), len(b)]

    for e in entries:
        row = {k: e[k] for k in ("name", "kind", "shape", "dtype")}
        if e["kind"] == "gptq":
            row["bits"] = e["bits"]
            row["scale"] = put(e["scale"].to(torch.float16).contiguous().numpy().tobytes())
        else:
            row["data"] = put(e["data"].to(torch.float16).contiguous().numpy().tobytes())
        table.append(row)
    gdir, streams = [], []
    for key, idx in groups.items():
        role, bits, cols = key.split(":")
        qs = [entries[i]["q"].numpy() for i in idx]
        codec, stream, perm = encode_group(qs, int(bits), codecs, role in sort_roles)
        crc = zlib.crc32(np.concatenate(qs, 0).tobytes())
        gdir.append({"key": key, "members": idx, "rows": [x.shape[0] for x in qs], "codec": codec,
                     "perm": put(perm), "length": len(stream), "crc32": crc})
        streams.append(stream)
    head = json.dumps({"tensors": table, "groups": gdir, "arch": arch}, sort_keys=True).encode()
    plain = struct.pack("<I", len(head)) + head + split_planes(b"".join(raw_parts))
    directory = brotli.compress(plain, quality=11)
    return (GROUP_MAGIC + struct.pack("<BII", GROUP_VERSION, len(directory), zlib.crc32(plain)) + directory
            + b"".join(streams))


def decode_weights(payload):
    """Inverse of encode_weights -> (entries, arch); CodecError on anything malformed or corrupted."""
    try:
        return _decode_weights(payload)
    except CodecError:
        raise
    except Exception as e:  # any other failure on hostile bytes is reported the same way
        raise CodecError(f"grouped payload does not decode ({type(e).__name__}: {e})") from None


def _decode_weights(payload):
    """decode_weights without the catch-all: parse the header, directory and group streams in order."""
    if payload[:4] != GROUP_MAGIC or len(payload) < 13:
        raise CodecError("not a grouped weight payload (bad magic)")
    version, dlen, dcrc = struct.unpack("<BII", payload[4:13])
    if version != GROUP_VERSION:
        raise CodecError(f"grouped payload version {version}, expected {GROUP_VERSION}")
    try:
        directory = brotli.decompress(payload[13:13 + dlen])
        if zlib.crc32(directory) != dcrc:
            raise CodecError("directory fails its crc32 (corrupted)")
        (hlen,) = struct.unpack("<I", directory[:4])
        head = json.loads(directory[4:4 + hlen].decode())
    except (brotli.error, struct.error, UnicodeDecodeError, ValueError) as e:
        raise CodecError(f"directory is corrupted ({type(e).__name__})") from None
    raw = join_planes(directory[4 + hlen:])

    def get(span, dtype, shape):
        """Tensor of `shape` from the directory's raw bytes at span [offset, length], bounds-checked."""
        off, n = span
        if off < 0 or off + n > len(raw) or n != np.dtype(dtype).itemsize * int(np.prod(shape)):
            raise CodecError("directory span out of range")
        return torch.from_numpy(np.frombuffer(raw, dtype, offset=off, count=int(np.prod(shape))).reshape(shape).copy())

    entries = []
    for row in head["tensors"]:
        e = {k: row[k] for k in ("name", "kind", "shape", "dtype")}
        if row["kind"] == "gptq":
            e["bits"] = row["bits"]
            e["scale"] = get(row["scale"], np.float16, [row["shape"][0]])
        else:
            e["data"] = get(row["data"], np.float16, row["shape"])
        entries.append(e)
    pos = 13 + dlen
    for g in head["groups"]:
        _role, bits, cols = g["key"].split(":")
        stream = payload[pos:pos + g["length"]]
        if len(stream) != g["length"]:
            raise CodecError(f"group {g['key']} truncated")
        pos += g["length"]
        off, n = g["perm"]
        qs = decode_group(stream, raw[off:off + n], g["rows"], int(cols), int(bits), g["codec"])
        if zlib.crc32(np.concatenate(qs, 0).tobytes()) != g["crc32"]:
            raise CodecError(f"group {g['key']} fails its crc32 (corrupted)")
        for i, q in zip(g["members"], qs):
            if list(q.shape) != entries[i]["shape"]:
                raise CodecError(f"group {g['key']} member shape mismatch")
            entries[i]["q"] = torch.from_numpy(q.copy())
    if pos != len(payload):
        raise CodecError("trailing bytes after the last group")
    return entries, head["arch"]
