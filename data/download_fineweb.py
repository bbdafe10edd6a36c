#!/usr/bin/env python3
"""Download the challenge's pre-tokenised FineWeb shards and tokenizer from a Hugging Face dataset repo.

Usage examples:
    python3 data/download_fineweb.py --variant sp1024 --train-shards 80
    python3 data/download_fineweb.py --variant sp8192 --train-shards 10

Layout written under --data-dir (default: the folder holding this script):
    manifest.json, manifest.source
    datasets/fineweb10B_<variant>/fineweb_{train,val}_NNNNNN.bin
    tokenizers/<tokenizer files named in the manifest>

The only network access goes through one injectable function, ``fetch(repo_id, remote_path) -> local path``;
the default, ``hf_fetch``, wraps ``huggingface_hub.hf_hub_download``.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

REPO_ENV = "MATCHED_FINEWEB_REPO_ID"
PREFIX_ENV = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_PREFIX = "datasets"
# Variants not hosted in the default repo, and the repo that hosts them.
VARIANT_DEFAULT_REPOS = {
    "sp8192": "kevclark/parameter-golf",
    "sp4096": "kevclark/parameter-golf",
}

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2

MANIFEST_NAME = "manifest.json"
MANIFEST_SOURCE_NAME = "manifest.source"
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")

FetchFn = Callable[[str, str], "os.PathLike[str] | str"]
LogFn = Callable[[str], None]


class DownloadError(RuntimeError):
    """Raised for any user-facing download or validation failure; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Network (the single injectable function)
# --------------------------------------------------------------------------------------------


def hf_fetch(repo_id: str, remote_path: str) -> Path:
    """Fetch one file of a HF dataset repo into the HF cache and return its local cached path."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DownloadError(
            "huggingface_hub is required for downloading; install it with: pip install huggingface_hub"
        ) from exc
    return Path(hf_hub_download(repo_id=repo_id, filename=remote_path, repo_type="dataset"))


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def remote_join(*parts: str) -> str:
    """Join repo path parts with '/', dropping empty parts and stray slashes."""
    cleaned = [p.strip("/") for p in parts if p and p.strip("/")]
    return posixpath.join(*cleaned) if cleaned else ""


def dataset_name(variant: str) -> str:
    """Return the dataset directory name for a variant, e.g. 'sp8192' -> 'fineweb10B_sp8192'."""
    return "fineweb10B_" + variant


def check_variant(variant: str) -> str:
    """Return the variant unchanged if it looks like sp<N> or byte<N>, else raise DownloadError."""
    if not re.fullmatch(r"(sp|byte)\d+", variant):
        raise DownloadError("bad --variant %r: expected something like sp1024, sp4096, sp8192 or byte260" % variant)
    return variant


def resolve_repo(variant: str, environ: Optional[Dict[str, str]] = None) -> Tuple[str, str]:
    """Return (repo_id, reason): the env override if set, else the variant's known repo, else the default."""
    env = os.environ if environ is None else environ
    override = env.get(REPO_ENV)
    if override:
        return override, "from $" + REPO_ENV
    if variant in VARIANT_DEFAULT_REPOS:
        return VARIANT_DEFAULT_REPOS[variant], "default repo for " + variant
    return DEFAULT_REPO_ID, "default repo"


def resolve_prefix(environ: Optional[Dict[str, str]] = None) -> str:
    """Return the folder prefix inside the repo ($MATCHED_FINEWEB_REMOTE_ROOT_PREFIX or 'datasets')."""
    env = os.environ if environ is None else environ
    value = env.get(PREFIX_ENV)
    return DEFAULT_PREFIX if value is None else value.strip("/")


def link_or_copy(src: Path, dst: Path) -> str:
    """Place src at dst atomically via hard link, falling back to copy; return 'linked' or 'copied'."""
    src = Path(os.path.realpath(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    try:
        os.link(src, tmp)
        how = "linked"
    except OSError:
        shutil.copyfile(src, tmp)
        how = "copied"
    os.replace(tmp, dst)
    return how


# --------------------------------------------------------------------------------------------
# Shard validation
# --------------------------------------------------------------------------------------------


def shard_token_count(path: Path) -> int:
    """Return the token count of a valid shard; raise DownloadError naming the file if it is malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DownloadError("shard %s: cannot stat (%s)" % (path, exc)) from exc
    if size < HEADER_BYTES:
        raise DownloadError("shard %s: only %d bytes, shorter than the %d-byte header" % (path, size, HEADER_BYTES))
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, ntok = int(header[0]), int(header[1]), int(header[2])
    if magic != SHARD_MAGIC:
        raise DownloadError("shard %s: bad magic %d (expected %d)" % (path, magic, SHARD_MAGIC))
    if version != SHARD_VERSION:
        raise DownloadError("shard %s: unsupported version %d (expected %d)" % (path, version, SHARD_VERSION))
    expected = HEADER_BYTES + TOKEN_BYTES * ntok
    if ntok < 0 or size != expected:
        raise DownloadError(
            "shard %s: size %d bytes does not match header token count %d (expected %d bytes)"
            % (path, size, ntok, expected)
        )
    return ntok


def shard_is_complete(path: Path) -> bool:
    """Return True if path exists and its size matches its own header, i.e. it need not be fetched again."""
    if not Path(path).is_file():
        return False
    try:
        shard_token_count(path)
    except DownloadError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def _source_line(repo_id: str, prefix: str) -> str:
    """Return the text stored in manifest.source identifying where a manifest came from."""
    return "%s %s" % (repo_id, prefix)


def read_manifest_source(data_dir: Path) -> Optional[str]:
    """Return the stored source line of the cached manifest, or None if unknown."""
    path = Path(data_dir) / MANIFEST_SOURCE_NAME
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def fetch_manifest(repo_id: str, prefix: str, data_dir: Path, fetch: FetchFn) -> dict:
    """Fetch <prefix>/manifest.json from the repo, cache it (plus its source) in data_dir, and return it."""
    remote = remote_join(prefix, MANIFEST_NAME)
    try:
        local = Path(fetch(repo_id, remote))
    except DownloadError:
        raise
    except Exception as exc:  # hub errors (missing repo/file, network): say which knobs select the location
        raise DownloadError(
            "could not fetch %s from dataset repo %s (%s); check %s and %s"
            % (remote, repo_id, exc, REPO_ENV, PREFIX_ENV)
        ) from exc
    try:
        manifest = json.loads(Path(local).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DownloadError("could not read manifest %s from repo %s: %s" % (remote, repo_id, exc)) from exc
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (data_dir / MANIFEST_SOURCE_NAME).write_text(_source_line(repo_id, prefix) + "\n", encoding="utf-8")
    return manifest


def load_manifest(
    repo_id: str, prefix: str, data_dir: Path, fetch: FetchFn, skip_manifest: bool, log: LogFn = print
) -> Tuple[dict, bool]:
    """Return (manifest, from_cache): cached copy if --skip-manifest and it came from this repo, else fetched."""
    cached = Path(data_dir) / MANIFEST_NAME
    if skip_manifest:
        if not cached.is_file():
            raise DownloadError("--skip-manifest given but no cached manifest at %s" % cached)
        source = read_manifest_source(data_dir)
        wanted = _source_line(repo_id, prefix)
        if source is None or source == wanted:
            try:
                return json.loads(cached.read_text(encoding="utf-8")), True
            except ValueError as exc:
                raise DownloadError("cached manifest %s is not valid JSON: %s" % (cached, exc)) from exc
        log("cached manifest came from '%s', not '%s': refetching it" % (source, wanted))
    return fetch_manifest(repo_id, prefix, data_dir, fetch), False


def find_dataset(manifest: dict, variant: str, repo_id: str) -> dict:
    """Return the manifest's entry for fineweb10B_<variant>; the error lists the variants that exist."""
    name = dataset_name(variant)
    entries = manifest.get("datasets") or []
    for entry in entries:
        if entry.get("name") == name:
            return entry
    names = sorted(str(e.get("name", "?")) for e in entries)
    available = [n[len("fineweb10B_"):] if n.startswith("fineweb10B_") else n for n in names]
    raise DownloadError(
        "variant %r (dataset %s) not found in the manifest of repo %s; available variants: %s. "
        "Set %s=<owner/repo> to use another repo (sp8192 and sp4096 live in %s)."
        % (
            variant,
            name,
            repo_id,
            ", ".join(available) if available else "(none)",
            REPO_ENV,
            VARIANT_DEFAULT_REPOS["sp8192"],
        )
    )


def find_tokenizer(manifest: dict, tokenizer_name: str) -> dict:
    """Return the manifest's tokenizer entry with this name, or raise DownloadError listing known names."""
    entries = manifest.get("tokenizers") or []
    for entry in entries:
        if entry.get("name") == tokenizer_name:
            return entry
    known = ", ".join(sorted(str(e.get("name", "?")) for e in entries)) or "(none)"
    raise DownloadError("tokenizer %r not found in manifest; known tokenizers: %s" % (tokenizer_name, known))


def tokenizer_paths(entry: dict) -> List[str]:
    """Return every string value of a tokenizer entry whose key ends in '_path' (files to fetch), sorted by key."""
    return [v for k, v in sorted(entry.items()) if k.endswith("_path") and isinstance(v, str) and v]


# --------------------------------------------------------------------------------------------
# Planning and downloading
# --------------------------------------------------------------------------------------------


def plan_downloads(
    manifest: dict, variant: str, train_shards: int, data_dir: Path, prefix: str, repo_id: str, with_docs: bool
) -> List[Tuple[str, Path, str]]:
    """Return (remote_path, local_path, kind) for every file to fetch; kind is 'val', 'train', 'tokenizer' or 'docs'."""
    data_dir = Path(data_dir)
    entry = find_dataset(manifest, variant, repo_id)
    name = entry["name"]
    stats = entry.get("stats") or {}
    try:
        files_val = int(stats["files_val"])
        files_train = int(stats["files_train"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DownloadError("manifest entry for %s lacks stats.files_val / stats.files_train" % name) from exc
    n_train = min(int(train_shards), files_train)
    ds_local = data_dir / "datasets" / name
    ds_remote = remote_join(prefix, "datasets", name)
    plan: List[Tuple[str, Path, str]] = []
    for i in range(files_val):
        fname = "fineweb_val_%06d.bin" % i
        plan.append((remote_join(ds_remote, fname), ds_local / fname, "val"))
    for i in range(n_train):
        fname = "fineweb_train_%06d.bin" % i
        plan.append((remote_join(ds_remote, fname), ds_local / fname, "train"))
    tok_name = entry.get("tokenizer_name")
    if tok_name:
        for rel in tokenizer_paths(find_tokenizer(manifest, tok_name)):
            plan.append((remote_join(prefix, rel), data_dir / "tokenizers" / posixpath.basename(rel), "tokenizer"))
    if with_docs:
        for fname in DOCS_FILES:
            plan.append((remote_join(prefix, fname), data_dir / fname, "docs"))
    return plan


def is_present(local: Path, kind: str) -> bool:
    """Return True if the local file is already complete: shards must match their header size, others be non-empty."""
    if kind in ("val", "train"):
        return shard_is_complete(local)
    return local.is_file() and local.stat().st_size > 0


def download_variant(
    variant: str,
    train_shards: int = 80,
    data_dir: "Path | str | None" = None,
    fetch: Optional[FetchFn] = None,
    skip_manifest: bool = False,
    with_docs: bool = False,
    repo_id: Optional[str] = None,
    prefix: Optional[str] = None,
    log: LogFn = print,
) -> dict:
    """Download and validate a variant's shards and tokenizer; return a summary dict (repo_id, dataset_dir, counts)."""
    check_variant(variant)
    if train_shards < 0:
        raise DownloadError("--train-shards must be >= 0, got %d" % train_shards)
    fetch = hf_fetch if fetch is None else fetch
    data_dir = Path(data_dir) if data_dir is not None else Path(__file__).resolve().parent
    if repo_id is None:
        repo_id, reason = resolve_repo(variant)
    else:
        reason = "given explicitly"
    prefix = resolve_prefix() if prefix is None else prefix.strip("/")
    log("using repo %s (%s), remote prefix '%s'" % (repo_id, reason, prefix))

    manifest, from_cache = load_manifest(repo_id, prefix, data_dir, fetch, skip_manifest, log)
    try:
        plan = plan_downloads(manifest, variant, train_shards, data_dir, prefix, repo_id, with_docs)
    except DownloadError:
        if not from_cache:
            raise
        log("variant %s not in the cached manifest; refetching it from %s" % (variant, repo_id))
        manifest = fetch_manifest(repo_id, prefix, data_dir, fetch)
        plan = plan_downloads(manifest, variant, train_shards, data_dir, prefix, repo_id, with_docs)

    entry = find_dataset(manifest, variant, repo_id)
    n_train_available = int(entry["stats"]["files_train"])
    if train_shards > n_train_available:
        log("only %d train shards exist for %s; fetching all of them" % (n_train_available, variant))

    fetched = skipped = 0
    for i, (remote, local, kind) in enumerate(plan, 1):
        if is_present(local, kind):
            skipped += 1
            continue
        log("[%d/%d] %s" % (i, len(plan), remote))
        try:
            src = Path(fetch(repo_id, remote))
        except DownloadError:
            raise
        except Exception as exc:  # network/hub errors: add the file name, keep the cause
            raise DownloadError("failed to fetch %s from repo %s: %s" % (remote, repo_id, exc)) from exc
        link_or_copy(src, local)
        fetched += 1

    tokens = {"val": 0, "train": 0}
    shard_count = {"val": 0, "train": 0}
    for _, local, kind in plan:
        if kind in tokens:
            tokens[kind] += shard_token_count(local)
            shard_count[kind] += 1
    dataset_dir = Path(data_dir) / "datasets" / entry["name"]
    log(
        "done: %s has %d val shard(s) (%d tokens) and %d train shard(s) (%d tokens); fetched %d file(s), skipped %d"
        % (dataset_dir, shard_count["val"], tokens["val"], shard_count["train"], tokens["train"], fetched, skipped)
    )
    return {
        "repo_id": repo_id,
        "dataset_dir": dataset_dir,
        "val_shards": shard_count["val"],
        "train_shards": shard_count["train"],
        "val_tokens": tokens["val"],
        "train_tokens": tokens["train"],
        "fetched": fetched,
        "skipped": skipped,
        "files": [local for _, local, _ in plan],
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser for this tool."""
    p = argparse.ArgumentParser(
        description="Download pre-tokenised FineWeb shards for Parameter Golf from a Hugging Face dataset repo.",
        epilog=(
            "Env: %s (repo id; default %s, or %s for sp8192/sp4096), %s (folder prefix in the repo; default '%s'). "
            "Needs: pip install huggingface_hub"
            % (REPO_ENV, DEFAULT_REPO_ID, VARIANT_DEFAULT_REPOS["sp8192"], PREFIX_ENV, DEFAULT_PREFIX)
        ),
    )
    p.add_argument("--variant", default="sp1024", help="tokenizer variant: sp1024, sp4096, sp8192, byte260, ... (default sp1024)")
    p.add_argument("--train-shards", type=int, default=80, help="number of train shards to fetch (default 80; capped at what exists)")
    p.add_argument("--skip-manifest", action="store_true", help="use the cached data-dir/manifest.json instead of refetching it")
    p.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl and its source manifest (large)")
    p.add_argument(
        "--data-dir", default=str(Path(__file__).resolve().parent), help="output root (default: the folder holding this script)"
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; return a process exit code (0 on success, 1 on a DownloadError)."""
    args = build_parser().parse_args(argv)
    try:
        download_variant(
            variant=args.variant,
            train_shards=args.train_shards,
            data_dir=args.data_dir,
            skip_manifest=args.skip_manifest,
            with_docs=args.with_docs,
        )
    except DownloadError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
