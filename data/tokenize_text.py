#!/usr/bin/env python3
"""Tokenise plain-text or JSONL documents with a SentencePiece model into challenge-format .bin shards.

Each document becomes [BOS] + tokens (no EOS); documents are concatenated. The first --val-docs documents go to
fineweb_val_000000.bin, the rest to fineweb_train_NNNNNN.bin shards of at most --shard-tokens tokens.

Shard format: a 1024-byte header of 256 little-endian int32 (slot 0 = magic 20240520, slot 1 = version 1,
slot 2 = token count N, rest 0) followed by N little-endian uint16 tokens.

Examples:
    python3 data/tokenize_text.py --model data/tokenizers/fineweb_8192_bpe.model --out data/datasets/mytext \
        --val-docs 1 book1.txt book2.txt
    python3 data/tokenize_text.py --train-tokenizer 1024 --model /tmp/my_1024.model --out /tmp/mydata \
        --split-on-blank-lines --val-docs 50 corpus.txt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 65536
DEFAULT_SHARD_TOKENS = 100_000_000
ENCODE_BATCH_DOCS = 256


class TokenizeError(RuntimeError):
    """Raised for user-facing input, model or shard-format errors."""


# --------------------------------------------------------------------------------------------
# Shard I/O
# --------------------------------------------------------------------------------------------


def write_shard(path: "str | os.PathLike[str]", tokens: Sequence[int]) -> int:
    """Write tokens (each in [0, 65535]) as a challenge shard at path, atomically; return the token count."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise TokenizeError("write_shard expects a 1-D token sequence, got shape %s" % (arr.shape,))
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= MAX_VOCAB):
        raise TokenizeError("token ids must lie in [0, %d) to fit uint16" % MAX_VOCAB)
    if arr.size >= 2**31:
        raise TokenizeError("too many tokens for one shard: %d" % arr.size)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = arr.size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)
    return int(arr.size)


def read_shard(path: "str | os.PathLike[str]") -> np.ndarray:
    """Read and validate a challenge shard; return its tokens as a 1-D np.uint16 array."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise TokenizeError("shard %s: shorter than the %d-byte header" % (path, HEADER_BYTES))
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise TokenizeError("shard %s: bad magic %d" % (path, int(header[0])))
    if int(header[1]) != SHARD_VERSION:
        raise TokenizeError("shard %s: unsupported version %d" % (path, int(header[1])))
    ntok = int(header[2])
    if size != HEADER_BYTES + 2 * ntok:
        raise TokenizeError("shard %s: size %d does not match header token count %d" % (path, size, ntok))
    tokens = np.fromfile(path, dtype="<u2", count=ntok, offset=HEADER_BYTES)
    return tokens.astype(np.uint16, copy=False)


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


def _is_jsonl(path: Path) -> bool:
    """Return True if the file name says JSON Lines (.jsonl / .ndjson)."""
    return path.suffix.lower() in (".jsonl", ".ndjson")


def iter_documents(
    paths: Iterable["str | os.PathLike[str]"], split_on_blank_lines: bool = False, text_field: str = "text"
) -> Iterator[str]:
    """Yield non-empty documents in input order: JSONL rows' text_field, whole text files, or blank-line blocks."""
    for p in paths:
        path = Path(p)
        if _is_jsonl(path):
            with open(path, "r", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise TokenizeError("%s:%d: invalid JSON (%s)" % (path, lineno, exc)) from exc
                    text = row.get(text_field) if isinstance(row, dict) else None
                    if not isinstance(text, str):
                        raise TokenizeError("%s:%d: no string field %r" % (path, lineno, text_field))
                    if text.strip():
                        yield text
            continue
        text = path.read_text(encoding="utf-8")
        if split_on_blank_lines:
            for block in re.split(r"\n[ \t\r\f\v]*\n", text):
                block = block.strip()
                if block:
                    yield block
        elif text.strip():
            yield text


def _training_lines(docs: Iterable[str]) -> Iterator[str]:
    """Yield the non-empty lines of every document (SentencePiece trains on sentence-sized pieces)."""
    for doc in docs:
        for line in doc.splitlines():
            line = line.strip()
            if line:
                yield line


# --------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------


def train_tokenizer(
    docs: Iterable[str], model_path: "str | os.PathLike[str]", vocab_size: int, max_sentences: int = 0
) -> Path:
    """Train a SentencePiece BPE model (challenge settings) on docs and write it to model_path (+ .vocab)."""
    import sentencepiece as spm

    if vocab_size > MAX_VOCAB:
        raise TokenizeError("--train-tokenizer %d exceeds the uint16 limit of %d" % (vocab_size, MAX_VOCAB))
    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise TokenizeError("--model must end in .model when training, got %s" % model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = str(model_path.with_suffix(""))
    options = dict(
        sentence_iterator=_training_lines(docs),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=0.999,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    if max_sentences > 0:
        options.update(input_sentence_size=max_sentences, shuffle_input_sentence=True)
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as exc:
        raise TokenizeError("SentencePiece training failed: %s" % exc) from exc
    return model_path


def load_model(model_path: "str | os.PathLike[str]"):
    """Load a SentencePiece model; raise TokenizeError if missing, vocab > 65536, or it has no BOS id."""
    import sentencepiece as spm

    model_path = Path(model_path)
    if not model_path.is_file():
        raise TokenizeError("SentencePiece model not found: %s" % model_path)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = sp.get_piece_size()
    if vocab > MAX_VOCAB:
        raise TokenizeError("vocab size %d of %s exceeds %d: tokens would not fit in uint16" % (vocab, model_path, MAX_VOCAB))
    if sp.bos_id() < 0:
        raise TokenizeError("model %s has no BOS piece (bos_id = -1); documents need a BOS separator" % model_path)
    return sp


# --------------------------------------------------------------------------------------------
# Tokenising into shards
# --------------------------------------------------------------------------------------------


class _TrainShardWriter:
    """Accumulate token chunks and emit fineweb_train_NNNNNN.bin files of exactly shard_tokens (last may be short)."""

    def __init__(self, out_dir: Path, shard_tokens: int):
        """Start writing shards into out_dir, each holding at most shard_tokens tokens."""
        self.out_dir = out_dir
        self.shard_tokens = shard_tokens
        self.chunks: List[np.ndarray] = []
        self.buffered = 0
        self.paths: List[Path] = []
        self.total = 0

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens, flushing full shards as the buffer fills."""
        self.chunks.append(tokens)
        self.buffered += tokens.size
        while self.buffered >= self.shard_tokens:
            merged = np.concatenate(self.chunks)
            self._write(merged[: self.shard_tokens])
            rest = merged[self.shard_tokens :]
            self.chunks = [rest] if rest.size else []
            self.buffered = int(rest.size)

    def close(self) -> None:
        """Write whatever is left as a final, shorter shard."""
        if self.buffered:
            self._write(np.concatenate(self.chunks))
        self.chunks, self.buffered = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        """Write one numbered train shard."""
        path = self.out_dir / ("fineweb_train_%06d.bin" % len(self.paths))
        write_shard(path, tokens)
        self.paths.append(path)
        self.total += int(tokens.size)


def _batched(items: Iterable[str], size: int) -> Iterator[List[str]]:
    """Yield lists of up to size consecutive items."""
    batch: List[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_documents(
    docs: Iterable[str],
    sp,
    out_dir: "str | os.PathLike[str]",
    val_docs: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """Encode docs as BOS+tokens, write val/train shards into out_dir, and return counts and written paths."""
    if shard_tokens <= 0:
        raise TokenizeError("--shard-tokens must be positive")
    if val_docs < 0:
        raise TokenizeError("--val-docs must be >= 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bos = np.array([sp.bos_id()], dtype=np.uint16)
    val_chunks: List[np.ndarray] = []
    train = _TrainShardWriter(out_dir, shard_tokens)
    n_docs = 0
    for batch in _batched(docs, ENCODE_BATCH_DOCS):
        for ids in sp.encode(batch):
            chunk = np.concatenate([bos, np.asarray(ids, dtype=np.uint16)])
            if n_docs < val_docs:
                val_chunks.append(chunk)
            else:
                train.add(chunk)
            n_docs += 1
    train.close()
    val_path = None
    val_tokens = 0
    if val_chunks:
        val_path = out_dir / "fineweb_val_000000.bin"
        val_tokens = write_shard(val_path, np.concatenate(val_chunks))
    return {
        "documents": n_docs,
        "val_documents": min(n_docs, val_docs),
        "train_documents": max(0, n_docs - val_docs),
        "val_tokens": val_tokens,
        "train_tokens": train.total,
        "val_path": val_path,
        "train_paths": list(train.paths),
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser for this tool."""
    p = argparse.ArgumentParser(
        description="Tokenise text/JSONL documents into Parameter Golf .bin shards (BOS + tokens per document)."
    )
    p.add_argument("inputs", nargs="+", help="text files (one document each) or .jsonl files with a text field")
    p.add_argument("--model", required=True, help="SentencePiece .model to use (written here with --train-tokenizer)")
    p.add_argument("--out", required=True, help="output directory for fineweb_{val,train}_NNNNNN.bin")
    p.add_argument("--val-docs", type=int, default=0, help="first K documents go to fineweb_val_000000.bin (default 0)")
    p.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="max tokens per train shard (default 100000000)"
    )
    p.add_argument("--split-on-blank-lines", action="store_true", help="each blank-line-separated block is a document")
    p.add_argument("--text-field", default="text", help="JSONL field holding the document text (default 'text')")
    p.add_argument(
        "--train-tokenizer", type=int, metavar="VOCAB", default=None, help="first train a BPE model of this vocab size"
    )
    p.add_argument(
        "--tokenizer-max-sentences",
        type=int,
        default=0,
        help="with --train-tokenizer, sample at most this many lines for training (default 0 = all)",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; return a process exit code (0 on success, 1 on a TokenizeError)."""
    args = build_parser().parse_args(argv)
    try:
        for name in args.inputs:
            if not Path(name).is_file():
                raise TokenizeError("input not found: %s" % name)

        def docs() -> Iterator[str]:
            """Return a fresh iterator over the input documents."""
            return iter_documents(args.inputs, args.split_on_blank_lines, args.text_field)

        if args.train_tokenizer is not None:
            train_tokenizer(docs(), args.model, args.train_tokenizer, args.tokenizer_max_sentences)
            print("trained tokenizer -> %s" % args.model)
        sp = load_model(args.model)
        stats = tokenize_documents(docs(), sp, args.out, args.val_docs, args.shard_tokens)
    except (TokenizeError, OSError) as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1
    if stats["val_path"] is None:
        print("note: no validation shard written (use --val-docs K to hold out the first K documents)")
    if stats["documents"] and stats["train_documents"] == 0:
        print("note: every document went to validation; no train shard written")
    print(
        "%d documents (vocab %d): val %d docs / %d tokens, train %d docs / %d tokens in %d shard(s) -> %s"
        % (
            stats["documents"],
            sp.get_piece_size(),
            stats["val_documents"],
            stats["val_tokens"],
            stats["train_documents"],
            stats["train_tokens"],
            len(stats["train_paths"]),
            args.out,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
