#!/usr/bin/env python3
"""CaseOps: a lossless case transform for ASCII letters, and a tool that writes CaseOps token shards plus the
per-token byte sidecar that exact BPB needs.

The transform (encode_case) rewrites every maximal run of ASCII letters [A-Za-z] ("word") in lower case and
records its case with private-use operator characters; nothing else in the text changes:

    TITLE   U+E001  before a word whose first letter was upper case
    ALLCAPS U+E002  before a word of >= 2 letters that was entirely upper case
    CAPNEXT U+E003  inside a word, before a letter (not the first) that was upper case
    ESCAPE  U+E004  before a literal U+E001..U+E004 of the input

    "hello" -> "hello"   "Hello" -> TITLE "hello"   "A" -> TITLE "a"   "NASA" -> ALLCAPS "nasa"
    "iPhone" -> "i" CAPNEXT "phone"   "McDonald" -> TITLE "mc" CAPNEXT "donald"   "ABc" -> TITLE "a" CAPNEXT "bc"

decode_case inverts it exactly: decode_case(encode_case(t)) == t for every string t. decode_case accepts any
string (e.g. model samples); it only ever deletes operator characters that act as operators and changes the
case of ASCII letters, which is what makes the byte accounting below exact.

Data tool: each document is normalised the way the tokenizer normalises it (SentencePiece's own normaliser,
nmt_nfkc: NFKC, whitespace runs collapsed to one space, leading/trailing whitespace dropped), transformed,
and written as BOS + tokens (no EOS), like tokenize_text.py. The first --val-docs documents go to
fineweb_val_000000.bin, the rest to fineweb_train_NNNNNN.bin. For validation a parallel shard
fineweb_val_bytes_000000.bin (same header format and token count) holds, per token, the number of UTF-8 bytes
of the ORIGINAL text that the token stands for; BOS and operator tokens hold 0.

"Original text" of a document, exactly: decode_case(sp.decode(ids)) where ids are the document's tokens, i.e.
the untransformed text the tokens decode to. Its UTF-8 length equals the sidecar sum over the document, and
for ordinary text it equals the normalised document (what the plain sp8192 tokenizer's tokens decode to), so
CaseOps and plain BPB divide by the same bytes. Documents where the two differ are counted as "lossy" (see
README).

Example:
    python3 data/caseops.py --model data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \
        --out data/datasets/mytext_caseops --val-docs 1 book1.txt book2.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tokenize_text as tt  # noqa: E402  (sibling script: shard I/O, document reading, shard writer)

TITLE, ALLCAPS, CAPNEXT, ESCAPE = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = TITLE + ALLCAPS + CAPNEXT + ESCAPE
OPERATOR_UTF8_BYTES = 3  # every operator is a 3-byte UTF-8 character
SPACE_PIECE = "\u2581"
SIDECAR_PREFIX = "fineweb_val_bytes_"


class CaseOpsError(tt.TokenizeError):
    """Raised for user-facing input, model or output errors; the message names the file."""


# --------------------------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------------------------

_ENCODE_RE = re.compile("[A-Za-z]+|[\ue001-\ue004]")
# An escape and the character it protects | an optional TITLE/ALLCAPS and a word (letters and CAPNEXTs) | a
# TITLE/ALLCAPS with no word after it (only in strings encode_case cannot produce; decoded as nothing).
_DECODE_RE = re.compile("\ue004(.?)|([\ue001\ue002]?)([A-Za-z\ue003]+)|[\ue001\ue002]", re.S)
_OPERATOR_RE = re.compile("[\ue001-\ue004]")


def _encode_word(m: "re.Match[str]") -> str:
    """encode_case for one regex match: a maximal run of ASCII letters, or one literal operator character."""
    w = m.group()
    if w in OPERATORS:
        return ESCAPE + w
    if w.islower():
        return w
    low = w.lower()
    if w.isupper():
        return (ALLCAPS if len(w) >= 2 else TITLE) + low
    if w[0].isupper() and w[1:].islower():
        return TITLE + low
    marks = [CAPNEXT + c if u.isupper() else c for u, c in zip(w[1:], low[1:])]
    return (TITLE if w[0].isupper() else "") + low[0] + "".join(marks)


def encode_case(text: str) -> str:
    """The CaseOps transform of text (see the module docstring); the inverse is decode_case."""
    return _ENCODE_RE.sub(_encode_word, text)


def _decode_word(m: "re.Match[str]") -> str:
    """decode_case for one regex match (escape pair, operator-prefixed word, or dangling operator)."""
    if m.group(1) is not None:
        return m.group(1)
    op, body = m.group(2), m.group(3)
    if body is None:
        return ""
    if op == ALLCAPS:
        return body.replace(CAPNEXT, "").upper()
    if CAPNEXT not in body:
        return body[0].upper() + body[1:] if op else body
    out, cap = [], op == TITLE
    for ch in body:
        if ch == CAPNEXT:
            cap = True
        else:
            out.append(ch.upper() if cap else ch)
            cap = False
    return "".join(out)


def decode_case(text: str) -> str:
    """Invert encode_case. Total on all strings: removes exactly operator_positions(text), recases ASCII letters."""
    return _DECODE_RE.sub(_decode_word, text)


def operator_positions(text: str) -> List[int]:
    """Indices of the characters decode_case deletes: every operator character except one that directly follows
    a deleting ESCAPE (that one is an escaped literal and is kept)."""
    out: List[int] = []
    escape_at = -2
    for m in _OPERATOR_RE.finditer(text):
        p = m.start()
        if p == escape_at + 1:
            continue
        out.append(p)
        if m.group() == ESCAPE:
            escape_at = p
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer side: documents -> tokens, and original bytes per token
# --------------------------------------------------------------------------------------------


def is_caseops_model(sp) -> bool:
    """True iff each of U+E001..U+E004 is a piece of its own in SentencePiece model sp."""
    return all(sp.id_to_piece(sp.piece_to_id(c)) == c for c in OPERATORS)


def normalize(sp, text: str) -> str:
    """text as the model's normaliser leaves it (nmt_nfkc, collapsed whitespace), with spaces as ' '."""
    return sp.normalize(text).replace(SPACE_PIECE, " ")


def encode_document(sp, text: str) -> List[int]:
    """Token ids (no BOS) of one document: normalise, case-transform, encode."""
    return sp.encode(encode_case(normalize(sp, text)))


class PieceSurfaces:
    """The UTF-8 bytes each token id contributes to sp.decode(ids) (byte pieces: their byte; ▁ -> space)."""

    def __init__(self, sp):
        """Tabulate surfaces of every id of SentencePiece model sp."""
        self.surface: List[bytes] = []
        self.unknown = sp.unk_id()
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                self.surface.append(bytes([int(piece[3:-1], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                self.surface.append(b"")
            else:
                self.surface.append(piece.replace(SPACE_PIECE, " ").encode("utf-8"))
        self.length = np.array([len(s) for s in self.surface], dtype=np.int64)

    def text(self, ids: Sequence[int]) -> str:
        """The transformed text ids decode to (raises UnicodeDecodeError if their bytes are not UTF-8)."""
        return b"".join(self.surface[i] for i in ids).decode("utf-8")


def original_bytes_per_token(surfaces: PieceSurfaces, ids: Sequence[int]) -> np.ndarray:
    """int64 array: for each token, the UTF-8 bytes of decode_case(decoded text) that the token produces.

    Rule: decode_case keeps every character of the decoded text except the operators it deletes, and changes
    only the case of ASCII letters (1 byte either way). So every surface byte of a token counts 1 original
    byte, except the bytes of deleted operator characters, which count 0. The sum over a document is therefore
    len(decode_case(text).encode()), and the sum over any prefix of tokens ending on a character boundary is
    the original byte length of that prefix's text.
    """
    ids = np.asarray(ids, dtype=np.int64)
    counts = surfaces.length[ids].copy()
    if ids.size and (ids == surfaces.unknown).any():
        raise CaseOpsError("document encodes to <unk>, whose original bytes are unknown (model has no byte_fallback?)")
    text = surfaces.text(ids.tolist())
    ops = operator_positions(text)
    if ops:
        offsets, char, byte = [], 0, 0
        for p in ops:  # byte offset of each deleted operator, in one left-to-right pass
            byte += len(text[char:p].encode("utf-8"))
            char = p
            offsets.append(byte)
        op_bytes = (np.asarray(offsets)[:, None] + np.arange(OPERATOR_UTF8_BYTES)).ravel()
        owner = np.searchsorted(np.cumsum(counts), op_bytes, side="right")  # token holding each byte
        np.subtract.at(counts, owner, 1)
    return counts


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def sidecar_name(val_name: str) -> str:
    """fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin (the name train_gpt.py looks for)."""
    return val_name.replace("_val_", "_val_bytes_", 1)


def _documents(paths: Iterable[str], split_on_blank_lines: bool, text_field: str) -> Iterator[str]:
    """tokenize_text.iter_documents, with a UTF-8 error naming the file."""
    for p in paths:
        try:
            yield from tt.iter_documents([p], split_on_blank_lines, text_field)
        except UnicodeDecodeError as exc:
            raise CaseOpsError("%s: not valid UTF-8 (%s at byte %d)" % (p, exc.reason, exc.start)) from None


def _existing_outputs(out_dir: Path) -> List[Path]:
    """Shards this tool would write that already exist in out_dir."""
    return sorted(set(out_dir.glob("fineweb_train_*.bin")) | set(out_dir.glob("fineweb_val_*.bin")))


def build_caseops_shards(
    docs: Iterable[str],
    sp,
    out_dir: "str | Path",
    val_docs: int = 0,
    shard_tokens: int = tt.DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
) -> dict:
    """Write CaseOps train/val shards and the val byte sidecar into out_dir; return counts and paths.

    Refuses (CaseOpsError) a model without the operator pieces and an out_dir that already holds shards unless
    overwrite (then shards of an earlier run that this run did not rewrite are deleted).
    """
    if not is_caseops_model(sp):
        raise CaseOpsError("the model has no CaseOps operator pieces (U+E001..U+E004): use a *_caseops_* model, "
                           "or data/tokenize_text.py for a plain tokenizer")
    if shard_tokens <= 0:
        raise CaseOpsError("--shard-tokens must be positive")
    if val_docs < 0:
        raise CaseOpsError("--val-docs must be >= 0")
    out_dir = Path(out_dir)
    existing = _existing_outputs(out_dir) if out_dir.exists() else []
    if existing and not overwrite:
        raise CaseOpsError("%s already exists: pass --overwrite to replace the shards in %s, or choose another --out"
                           % (existing[0], out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    surfaces = PieceSurfaces(sp)
    bos = sp.bos_id()
    val_tokens: List[np.ndarray] = []
    val_bytes: List[np.ndarray] = []
    train = tt._TrainShardWriter(out_dir, shard_tokens)
    n_docs = lossy = original_bytes = 0
    for batch in tt._batched(docs, tt.ENCODE_BATCH_DOCS):
        normalized = [normalize(sp, d) for d in batch]
        for text, ids in zip(normalized, sp.encode([encode_case(t) for t in normalized])):
            tokens = np.asarray([bos] + ids, dtype=np.uint16)
            if n_docs < val_docs:
                transformed = surfaces.text(ids)
                if transformed != sp.decode(ids):
                    raise CaseOpsError("document %d: the token pieces do not concatenate to sp.decode(ids); the "
                                       "sidecar builder does not support this model's decoding" % n_docs)
                nbytes = original_bytes_per_token(surfaces, ids)
                decoded = decode_case(transformed)
                assert int(nbytes.sum()) == len(decoded.encode("utf-8")), n_docs  # holds by construction
                lossy += decoded != text
                original_bytes += int(nbytes.sum())
                val_tokens.append(tokens)
                val_bytes.append(np.concatenate([[0], nbytes]))
            else:
                train.add(tokens)
            n_docs += 1
    train.close()
    written = list(train.paths)
    val_path = side_path = None
    if val_tokens:
        val_path = out_dir / "fineweb_val_000000.bin"
        side_path = out_dir / sidecar_name(val_path.name)
        tt.write_shard(val_path, np.concatenate(val_tokens))
        tt.write_shard(side_path, np.concatenate(val_bytes))
        written += [val_path, side_path]
    removed = [p for p in existing if p not in written]
    for p in removed:
        p.unlink()
    return {
        "documents": n_docs,
        "val_documents": min(n_docs, val_docs),
        "train_documents": max(0, n_docs - val_docs),
        "val_tokens": int(sum(t.size for t in val_tokens)),
        "val_original_bytes": original_bytes,
        "val_lossy_documents": lossy,
        "train_tokens": train.total,
        "val_path": val_path,
        "sidecar_path": side_path,
        "train_paths": list(train.paths),
        "removed": removed,
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser for this tool."""
    p = argparse.ArgumentParser(description="Write CaseOps-transformed Parameter Golf shards and the val byte sidecar.")
    p.add_argument("inputs", nargs="+", help="text files (one document each) or .jsonl files with a text field")
    p.add_argument("--model", required=True, help="CaseOps SentencePiece .model (U+E001..U+E004 as pieces)")
    p.add_argument("--out", required=True, help="output directory for fineweb_{train,val,val_bytes}_NNNNNN.bin")
    p.add_argument("--val-docs", type=int, default=0,
                   help="first K documents go to fineweb_val_000000.bin + its byte sidecar (default 0)")
    p.add_argument("--shard-tokens", type=int, default=tt.DEFAULT_SHARD_TOKENS,
                   help="max tokens per train shard (default 100000000)")
    p.add_argument("--split-on-blank-lines", action="store_true", help="each blank-line-separated block is a document")
    p.add_argument("--text-field", default="text", help="JSONL field holding the document text (default 'text')")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; return a process exit code (0 on success, 1 on an input/model/output error)."""
    args = build_parser().parse_args(argv)
    try:
        for name in args.inputs:
            if not Path(name).is_file():
                raise CaseOpsError("input not found: %s" % name)
        sp = tt.load_model(args.model)
        if not is_caseops_model(sp):
            raise CaseOpsError("model %s has no CaseOps operator pieces (U+E001..U+E004): use a *_caseops_* model, "
                               "or data/tokenize_text.py for a plain tokenizer" % args.model)
        docs = _documents(args.inputs, args.split_on_blank_lines, args.text_field)
        stats = build_caseops_shards(docs, sp, args.out, args.val_docs, args.shard_tokens, args.overwrite)
    except (tt.TokenizeError, OSError) as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1
    for p in stats["removed"]:
        print("removed stale %s" % p)
    if stats["val_path"] is None:
        print("note: no validation shard or sidecar written (use --val-docs K to hold out the first K documents)")
    if stats["val_lossy_documents"]:
        print("note: %d val document(s) do not decode back to their normalised text (BPB counts the bytes they "
              "do decode to)" % stats["val_lossy_documents"])
    print("%d documents: val %d docs / %d tokens / %d original bytes, train %d docs / %d tokens in %d shard(s) -> %s"
          % (stats["documents"], stats["val_documents"], stats["val_tokens"], stats["val_original_bytes"],
             stats["train_documents"], stats["train_tokens"], len(stats["train_paths"]), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
