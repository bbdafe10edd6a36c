"""Tests for data/download_fineweb.py and data/tokenize_text.py (no network; fake fetch, tiny corpora)."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHARED_MODEL = SHARED / "tokenizers" / "fineweb_8192_bpe.model"
OZ_TEXT = SHARED / "text" / "gutenberg_55_wonderful_wizard_of_oz.txt"


def _load(name: str):
    """Import data/<name>.py by path (data/ is not a package) and return the module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / (name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


dl = _load("download_fineweb")
tt = _load("tokenize_text")


# --------------------------------------------------------------------------------------------
# Fake hub
# --------------------------------------------------------------------------------------------


def shard_bytes(tokens, magic=20240520, version=1, count=None) -> bytes:
    """Build a shard's bytes independently of the tools under test (optionally with a wrong header)."""
    n = len(tokens) if count is None else count
    header = struct.pack("<256i", magic, version, n, *([0] * 253))
    return header + struct.pack("<%dH" % len(tokens), *tokens)


def make_manifest(variants=("sp8192",), files_train=3, files_val=1) -> dict:
    """Return a manifest in the hub's format with one dataset and tokenizer per variant."""
    datasets, tokenizers = [], []
    for v in variants:
        vocab = v[2:]
        datasets.append(
            {
                "name": "fineweb10B_" + v,
                "tokenizer_name": "sp_bpe_" + vocab,
                "stats": {"files_train": files_train, "files_val": files_val},
            }
        )
        tokenizers.append(
            {
                "name": "sp_bpe_" + vocab,
                "kind": "sentencepiece_bpe",
                "vocab_size": int(vocab),
                "model_path": "tokenizers/fineweb_%s_bpe.model" % vocab,
                "vocab_path": "tokenizers/fineweb_%s_bpe.vocab" % vocab,
            }
        )
    return {"datasets": datasets, "tokenizers": tokenizers}


def build_repo(root: Path, manifest: dict, prefix: str = "datasets") -> None:
    """Materialise a fake HF repo at root: manifest, shards (shard i holds i+5 tokens), tokenizer files, docs."""
    base = root / prefix
    base.mkdir(parents=True, exist_ok=True)
    (base / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    for ds in manifest["datasets"]:
        d = base / "datasets" / ds["name"]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(ds["stats"]["files_val"]):
            (d / ("fineweb_val_%06d.bin" % i)).write_bytes(shard_bytes([1, 7, 8, 9, 10 + i]))
        for i in range(ds["stats"]["files_train"]):
            (d / ("fineweb_train_%06d.bin" % i)).write_bytes(shard_bytes(list(range(1, i + 6))))
    for tok in manifest["tokenizers"]:
        for key, rel in tok.items():
            if key.endswith("_path"):
                p = base / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"fake " + key.encode())
    (base / "docs_selected.jsonl").write_text('{"text": "hi"}\n', encoding="utf-8")
    (base / "docs_selected.source_manifest.json").write_text("{}", encoding="utf-8")


class FakeHub:
    """A fake fetch(repo_id, remote_path) over local folders; records every call."""

    def __init__(self, repos: dict):
        """Serve repo_id -> local root folder."""
        self.repos = repos
        self.calls = []

    def __call__(self, repo_id: str, remote_path: str) -> Path:
        """Return the local path of remote_path in repo_id, or raise FileNotFoundError."""
        self.calls.append((repo_id, remote_path))
        path = self.repos[repo_id] / remote_path
        if not path.is_file():
            raise FileNotFoundError("%s not in %s" % (remote_path, repo_id))
        return path

    def fetched(self, suffix: str = "") -> list:
        """Return remote paths fetched so far that end with suffix."""
        return [p for _, p in self.calls if p.endswith(suffix)]


@pytest.fixture
def hub(tmp_path):
    """Two fake repos: 'a/pg' hosting sp1024 only, 'b/pg' hosting sp8192 and sp4096."""
    build_repo(tmp_path / "repo_a", make_manifest(("sp1024",)))
    build_repo(tmp_path / "repo_b", make_manifest(("sp8192", "sp4096")))
    return FakeHub({"a/pg": tmp_path / "repo_a", "b/pg": tmp_path / "repo_b"})


def run(hub, data_dir, variant="sp8192", repo="b/pg", **kw):
    """Call download_variant with the fake hub and a silent log."""
    return dl.download_variant(variant, data_dir=data_dir, fetch=hub, repo_id=repo, prefix="datasets", log=lambda m: None, **kw)


# --------------------------------------------------------------------------------------------
# Downloader
# --------------------------------------------------------------------------------------------


def test_download_layout_and_train_cap(hub, tmp_path):
    data = tmp_path / "data"
    summary = run(hub, data, train_shards=10)
    ds = data / "datasets" / "fineweb10B_sp8192"
    assert sorted(p.name for p in ds.iterdir()) == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
        "fineweb_val_000000.bin",
    ]
    assert sorted(p.name for p in (data / "tokenizers").iterdir()) == ["fineweb_8192_bpe.model", "fineweb_8192_bpe.vocab"]
    assert (data / "tokenizers" / "fineweb_8192_bpe.model").read_bytes() == b"fake model_path"
    assert (data / "manifest.json").is_file() and "b/pg" in (data / "manifest.source").read_text()
    assert summary["train_shards"] == 3 and summary["val_shards"] == 1
    assert summary["train_tokens"] == 5 + 6 + 7 and summary["val_tokens"] == 5
    assert summary["dataset_dir"] == ds
    # the remote paths requested follow <prefix>/datasets/<name>/<file>
    assert "datasets/datasets/fineweb10B_sp8192/fineweb_train_000002.bin" in hub.fetched()
    assert "datasets/docs_selected.jsonl" not in hub.fetched()
    # files come out of the "cache" by hard link (same filesystem here)
    assert os.path.samefile(ds / "fineweb_val_000000.bin", tmp_path / "repo_b/datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin")


def test_download_fewer_train_shards_and_docs(hub, tmp_path):
    data = tmp_path / "data"
    summary = run(hub, data, train_shards=2, with_docs=True)
    ds = data / "datasets" / "fineweb10B_sp8192"
    assert sorted(p.name for p in ds.glob("fineweb_train_*.bin")) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert summary["train_shards"] == 2
    assert (data / "docs_selected.jsonl").read_text() == '{"text": "hi"}\n'
    assert (data / "docs_selected.source_manifest.json").is_file()
    assert run(hub, tmp_path / "zero", train_shards=0)["train_shards"] == 0


def test_link_falls_back_to_copy(hub, tmp_path, monkeypatch):
    def no_link(*a, **k):
        raise OSError("cross-device link")

    monkeypatch.setattr(dl.os, "link", no_link)
    data = tmp_path / "data"
    run(hub, data, train_shards=1)
    local = data / "datasets" / "fineweb10B_sp8192" / "fineweb_train_000000.bin"
    remote = tmp_path / "repo_b/datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin"
    assert local.read_bytes() == remote.read_bytes() and not os.path.samefile(local, remote)


def test_skip_files_already_present(hub, tmp_path):
    data = tmp_path / "data"
    run(hub, data, train_shards=3)
    first = len(hub.calls)
    hub.calls.clear()
    summary = run(hub, data, train_shards=3)
    assert hub.fetched() == ["datasets/manifest.json"], hub.calls
    assert summary["fetched"] == 0 and summary["skipped"] == first - 1
    # a truncated shard has the wrong size for its header and is fetched again
    bad = data / "datasets" / "fineweb10B_sp8192" / "fineweb_train_000001.bin"
    truncated = bad.read_bytes()[:-2]
    bad.unlink()  # the local file is a hard link into the "cache": replace it, do not write through it
    bad.write_bytes(truncated)
    hub.calls.clear()
    summary = run(hub, data, train_shards=3)
    assert hub.fetched(".bin") == ["datasets/datasets/fineweb10B_sp8192/fineweb_train_000001.bin"]
    assert summary["fetched"] == 1 and dl.shard_token_count(bad) == 6


def test_skip_manifest_uses_cache_when_source_matches(hub, tmp_path):
    data = tmp_path / "data"
    run(hub, data, train_shards=1)
    hub.calls.clear()
    run(hub, data, train_shards=1, skip_manifest=True)
    assert hub.fetched("manifest.json") == []


def test_skip_manifest_without_cache_is_an_error(hub, tmp_path):
    with pytest.raises(dl.DownloadError, match="no cached manifest"):
        run(hub, tmp_path / "empty", skip_manifest=True)


def test_stale_manifest_from_other_repo_is_refetched(hub, tmp_path):
    data = tmp_path / "data"
    run(hub, data, variant="sp1024", repo="a/pg", train_shards=1)
    assert "a/pg" in (data / "manifest.source").read_text()
    hub.calls.clear()
    summary = run(hub, data, variant="sp8192", repo="b/pg", train_shards=1, skip_manifest=True)
    assert ("b/pg", "datasets/manifest.json") in hub.calls
    assert "b/pg" in (data / "manifest.source").read_text()
    assert summary["train_shards"] == 1
    assert [d["name"] for d in json.loads((data / "manifest.json").read_text())["datasets"]] == [
        "fineweb10B_sp8192",
        "fineweb10B_sp4096",
    ]


def test_stale_manifest_listing_the_variant_is_still_refetched(hub, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps(make_manifest(("sp8192",), files_train=1)))
    (data / "manifest.source").write_text("a/pg datasets\n")
    summary = run(hub, data, variant="sp8192", repo="b/pg", train_shards=10, skip_manifest=True)
    assert hub.fetched("manifest.json") == ["datasets/manifest.json"]
    assert summary["train_shards"] == 3  # from b/pg's manifest, not the stale one (1 shard)


def test_cached_manifest_of_unknown_source_missing_variant_is_refetched(hub, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps(make_manifest(("sp1024",))))
    summary = run(hub, data, variant="sp4096", repo="b/pg", train_shards=1, skip_manifest=True)
    assert hub.fetched("manifest.json") == ["datasets/manifest.json"]
    assert summary["dataset_dir"].name == "fineweb10B_sp4096"


def test_unknown_variant_error_lists_available(hub, tmp_path):
    with pytest.raises(dl.DownloadError) as info:
        run(hub, tmp_path / "data", variant="sp8192", repo="a/pg")
    msg = str(info.value)
    assert "sp8192" in msg and "available variants: sp1024" in msg
    assert "MATCHED_FINEWEB_REPO_ID" in msg and "a/pg" in msg


def test_bad_variant_name_rejected(hub, tmp_path):
    with pytest.raises(dl.DownloadError, match="bad --variant"):
        run(hub, tmp_path / "data", variant="../etc")


@pytest.mark.parametrize(
    "payload, reason",
    [
        (shard_bytes([1, 2, 3], count=4), "does not match"),
        (shard_bytes([1, 2, 3], magic=1234), "bad magic"),
        (shard_bytes([1, 2, 3], version=2), "version"),
        (b"\x00" * 100, "header"),
    ],
)
def test_bad_shard_error_names_file(hub, tmp_path, payload, reason):
    remote = tmp_path / "repo_b/datasets/datasets/fineweb10B_sp8192/fineweb_train_000001.bin"
    remote.write_bytes(payload)
    with pytest.raises(dl.DownloadError) as info:
        run(hub, tmp_path / "data", train_shards=3)
    assert "fineweb_train_000001.bin" in str(info.value) and reason in str(info.value)


def test_fetch_failure_names_file(hub, tmp_path):
    (tmp_path / "repo_b/datasets/tokenizers/fineweb_8192_bpe.vocab").unlink()
    with pytest.raises(dl.DownloadError, match="fineweb_8192_bpe.vocab"):
        run(hub, tmp_path / "data", train_shards=1)


def test_missing_manifest_error_names_env_vars(hub, tmp_path):
    with pytest.raises(dl.DownloadError, match="MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"):
        dl.download_variant("sp8192", data_dir=tmp_path / "d", fetch=hub, repo_id="b/pg", prefix="nope", log=lambda m: None)


def test_resolve_repo_and_prefix():
    env = {}
    assert dl.resolve_repo("sp1024", env)[0] == "willdepueoai/parameter-golf"
    assert dl.resolve_repo("sp8192", env)[0] == "kevclark/parameter-golf"
    env = {"MATCHED_FINEWEB_REPO_ID": "me/mine"}
    assert dl.resolve_repo("sp8192", env)[0] == "me/mine"
    assert dl.resolve_prefix({}) == "datasets"
    assert dl.resolve_prefix({"MATCHED_FINEWEB_REMOTE_ROOT_PREFIX": "v2/"}) == "v2"
    assert dl.remote_join("", "manifest.json") == "manifest.json"


def test_env_repo_used_by_default(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "b/pg")
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)
    logs = []
    summary = dl.download_variant("sp4096", train_shards=1, data_dir=tmp_path / "d", fetch=hub, log=logs.append)
    assert summary["repo_id"] == "b/pg" and any("b/pg" in line for line in logs)


def test_tokenizer_paths_takes_every_path_key():
    entry = {"name": "x", "model_path": "t/a.model", "vocab_path": "t/a.vocab", "json_path": "t/a.json", "size": 3}
    assert dl.tokenizer_paths(entry) == ["t/a.json", "t/a.model", "t/a.vocab"]


def test_missing_huggingface_hub_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(dl.DownloadError, match="pip install huggingface_hub"):
        dl.hf_fetch("a/b", "x")


# --------------------------------------------------------------------------------------------
# Shard I/O
# --------------------------------------------------------------------------------------------


def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 65535, 42, 8191], dtype=np.int64)
    path = tmp_path / "s.bin"
    assert tt.write_shard(path, tokens) == 5
    raw = path.read_bytes()
    assert len(raw) == 1024 + 10
    assert struct.unpack("<3i", raw[:12]) == (20240520, 1, 5)
    assert raw[12:1024] == b"\x00" * 1012
    back = tt.read_shard(path)
    assert back.dtype == np.uint16 and back.tolist() == tokens.tolist()
    assert dl.shard_token_count(path) == 5
    tt.write_shard(path, [])
    assert tt.read_shard(path).size == 0


def test_shard_writer_and_reader_reject_bad_input(tmp_path):
    with pytest.raises(tt.TokenizeError):
        tt.write_shard(tmp_path / "x.bin", [1, 65536])
    with pytest.raises(tt.TokenizeError):
        tt.write_shard(tmp_path / "x.bin", [-1])
    bad = tmp_path / "bad.bin"
    bad.write_bytes(shard_bytes([1, 2], count=3))
    with pytest.raises(tt.TokenizeError, match="bad.bin"):
        tt.read_shard(bad)


# --------------------------------------------------------------------------------------------
# Tokenising text
# --------------------------------------------------------------------------------------------


CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was 2024 and the fox was 7 years old.",
    "Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry and Aunt Em.",
    "A small model must learn to compress text well; every byte of the artifact counts.",
    "Numbers like 12345 and 67890 are split into single digits by the tokenizer.",
    "Café naïve résumé — unicode text goes through NFKC normalisation ﬁrst.",
    "The wind blew hard across the plains, and the little house shook on its frame.",
]


def normalised(text: str) -> str:
    """What an nmt_nfkc SentencePiece model decodes text back to: NFKC with whitespace runs collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def split_docs(tokens: np.ndarray, bos: int) -> list:
    """Split a token stream at BOS tokens into per-document token lists (BOS removed)."""
    starts = np.flatnonzero(tokens == bos).tolist() + [tokens.size]
    return [tokens[a + 1 : b].tolist() for a, b in zip(starts[:-1], starts[1:])]


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """Run the CLI on a tiny corpus (3 text files + 1 JSONL), training a ~400-piece tokenizer on the fly."""
    root = tmp_path_factory.mktemp("corpus")
    files = []
    for i, doc in enumerate(CORPUS[:3]):
        p = root / ("doc%d.txt" % i)
        p.write_text(doc * 3 + "\n", encoding="utf-8")
        files.append(p)
    jl = root / "more.jsonl"
    jl.write_text("".join(json.dumps({"text": d * 3, "id": i}) + "\n" for i, d in enumerate(CORPUS[3:])), encoding="utf-8")
    files.append(jl)
    docs = [d * 3 for d in CORPUS]
    model = root / "tok" / "tiny.model"
    out = root / "out"
    argv = ["--train-tokenizer", "400", "--model", str(model), "--out", str(out), "--val-docs", "2", "--shard-tokens", "60"]
    rc = tt.main(argv + [str(f) for f in files])
    assert rc == 0
    return {"docs": docs, "model": model, "out": out, "files": files}


def test_tokenize_text_bos_split_and_decode(corpus_run):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(corpus_run["model"]))
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    out = corpus_run["out"]
    val = tt.read_shard(out / "fineweb_val_000000.bin")
    train_paths = sorted(out.glob("fineweb_train_*.bin"))
    assert len(train_paths) >= 2, "shard-tokens=60 should force several train shards"
    sizes = [tt.read_shard(p).size for p in train_paths]
    assert all(s == 60 for s in sizes[:-1]) and 0 < sizes[-1] <= 60
    train = np.concatenate([tt.read_shard(p) for p in train_paths])
    docs = corpus_run["docs"]
    assert int((val == 1).sum()) == 2
    assert int((train == 1).sum()) == len(docs) - 2
    assert val[0] == 1 and train[0] == 1 and 2 not in val.tolist() + train.tolist()
    decoded = [sp.decode(ids) for ids in split_docs(val, 1) + split_docs(train, 1)]
    assert decoded == [normalised(d) for d in docs]


def test_split_on_blank_lines(tmp_path, corpus_run):
    import sentencepiece as spm

    text = CORPUS[0] + "\n\n" + CORPUS[1] + "\n  \n\n" + CORPUS[2] + "\nstill the same block\n"
    src = tmp_path / "blocks.txt"
    src.write_text(text, encoding="utf-8")
    blocks = list(tt.iter_documents([src], split_on_blank_lines=True))
    assert blocks == [CORPUS[0], CORPUS[1], CORPUS[2] + "\nstill the same block"]
    assert list(tt.iter_documents([src])) == [text]
    sp = spm.SentencePieceProcessor(model_file=str(corpus_run["model"]))
    stats = tt.tokenize_documents(blocks, sp, tmp_path / "o", val_docs=1)
    assert stats["val_documents"] == 1 and stats["train_documents"] == 2
    train = tt.read_shard(tmp_path / "o" / "fineweb_train_000000.bin")
    assert int((train == sp.bos_id()).sum()) == 2 and len(stats["train_paths"]) == 1


def test_vocab_limit_errors(tmp_path, corpus_run, monkeypatch):
    with pytest.raises(tt.TokenizeError, match="65536"):
        tt.train_tokenizer(["x"], tmp_path / "big.model", 70000)
    import sentencepiece as spm

    class Huge:
        """A stand-in model reporting a vocab too large for uint16."""

        def __init__(self, **kw):
            """Accept any constructor arguments."""

        def get_piece_size(self):
            """Report 70000 pieces."""
            return 70000

        def bos_id(self):
            """Report BOS id 1."""
            return 1

    monkeypatch.setattr(spm, "SentencePieceProcessor", Huge)
    with pytest.raises(tt.TokenizeError, match="65536"):
        tt.load_model(corpus_run["model"])
    assert tt.main(["--model", str(corpus_run["model"]), "--out", str(tmp_path / "o"), str(corpus_run["files"][0])]) == 1


def test_jsonl_without_text_field_errors(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"body": "no text here"}\n', encoding="utf-8")
    with pytest.raises(tt.TokenizeError, match="x.jsonl:1"):
        list(tt.iter_documents([p]))


@pytest.mark.skipif(not (SHARED_MODEL.is_file() and OZ_TEXT.is_file()), reason="shared sp8192 tokenizer/text absent")
def test_shared_sp8192_tokenizer_on_oz(tmp_path):
    out = tmp_path / "oz"
    rc = tt.main(["--model", str(SHARED_MODEL), "--out", str(out), "--split-on-blank-lines", "--val-docs", "20", str(OZ_TEXT)])
    assert rc == 0
    sp = tt.load_model(SHARED_MODEL)
    assert sp.get_piece_size() == 8192 and sp.bos_id() == 1
    docs = list(tt.iter_documents([OZ_TEXT], split_on_blank_lines=True))
    val = tt.read_shard(out / "fineweb_val_000000.bin")
    train = tt.read_shard(out / "fineweb_train_000000.bin")
    assert not (out / "fineweb_train_000001.bin").exists()
    assert int((val == 1).sum()) == 20 and int((train == 1).sum()) == len(docs) - 20
    assert int(max(val.max(), train.max())) < 8192
    per_doc = split_docs(val, 1) + split_docs(train, 1)
    for i in (0, 25, len(docs) - 1):
        assert sp.decode(per_doc[i]) == normalised(docs[i])
    # a book of ~210 kB should be ~50k tokens with an 8192 vocab (sanity bound, not exact)
    assert 30_000 < val.size + train.size < 80_000
