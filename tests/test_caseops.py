"""CaseOps: the lossless case transform of data/caseops.py, its shard + byte-sidecar tool, and exact BPB in
train_gpt.py through the per-token byte sidecar (SidecarByteCounter, load_validation_bytes, CASEOPS)."""
import dataclasses
import importlib.util
import itertools
import json
import math
import random
import re
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, SHARED, SHARED_TEXT, SHARED_TOKENIZER, tg, tiny_config
import pipeline_helpers as ph

CASEOPS_MODEL = SHARED / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
CPU = torch.device("cpu")


def _load_caseops():
    """Import data/caseops.py by path (data/ is not a package)."""
    spec = importlib.util.spec_from_file_location("caseops", ROOT / "data" / "caseops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["caseops"] = module
    spec.loader.exec_module(module)
    return module


co = _load_caseops()
T, A, C, E = co.TITLE, co.ALLCAPS, co.CAPNEXT, co.ESCAPE
OPS = T + A + C + E


def quiet(*args, **kwargs):
    """A log function that drops lines."""


class Recorder(list):
    """A log function that keeps lines."""

    def __call__(self, line, console=True):
        self.append(line)


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------

EXAMPLES = [
    ("hello", "hello"), ("Hello", T + "hello"), ("NASA", A + "nasa"), ("iPhone", "i" + C + "phone"),
    ("A", T + "a"), ("a", "a"), ("I am", T + "i am"), ("aB", "a" + C + "b"), ("ABc", T + "a" + C + "bc"),
    ("McDonald", T + "mc" + C + "donald"), ("HTTPServer", T + "h" + C + "t" + C + "t" + C + "p" + C + "server"),
    ("iPhone15X", "i" + C + "phone15" + T + "x"), ("A1B", T + "a1" + T + "b"), ("OK.", A + "ok."),
    ("eBay's CEO", "e" + C + "bay's " + A + "ceo"), ("snake_Case", "snake_" + T + "case"),
    ("", ""), (T, E + T), (E + E, E + E + E + E), (OPS, E + T + E + A + E + C + E + E),
    ("A" + C + "B", T + "a" + E + C + T + "b"), ("x" + T + "Y", "x" + E + T + T + "y"),
    ("ÉCOLE", "É" + A + "cole"), ("Straße", T + "straße"), ("Ωmega", "Ωmega"), ("ＡＢＣ", "ＡＢＣ"),
    ("Москва", "Москва"), ("Tōkyō", T + "tōkyō"),
]


@pytest.mark.parametrize("text,encoded", EXAMPLES)
def test_encode_case_examples(text, encoded):
    assert co.encode_case(text) == encoded
    assert co.decode_case(encoded) == text


ADVERSARIAL = [
    "", " ", "\n\n", T, A, C, E, T * 3, E * 5, OPS, OPS[::-1], OPS * 3 + "x", E + "a", "a" + E, T + "a", "a" + T,
    "A" + T, T + "A", "Ab" + C + "cD", C + "x", "x" + C, A + "AB", "AB" + A + "CD", E + "\n" + E, "a\ue000b\ue005c",
    "I", "i", "X Y z", "aB", "Ab", "ABc", "aBC", "AbC", "abC", "A1B", "iPhone15X", "x1Y2z3", "ID3v2", "CamelCaseWord",
    "Привет, Мир", "Ἀθῆναι", "東京タワー Tokyo", "🙂👍🏽 Emoji👨‍👩‍👧", "e\u0301 E\u0301 \u0301A", "Ǆ ǅ ǆ", "ﬁ ﬂ Ⅳ ™",
    "İstanbul ıI", "Kelvin \u212a", "tab\tNEW\nLine\r\nCRLF", "\x00\x01NUL", "\u2581Hi", "\ud7ff\ue000\uf8ff",
]


def assert_canonical(encoded):
    """Structure of encode_case output: no ASCII capitals; each operator is escaped or directly starts/marks
    lower-case letters; ALLCAPS always covers >= 2 letters."""
    assert not any("A" <= ch <= "Z" for ch in encoded)
    i = 0
    while i < len(encoded):
        ch = encoded[i]
        if ch == E:
            assert i + 1 < len(encoded) and encoded[i + 1] in OPS
            i += 2
            continue
        if ch in (T, C):
            assert encoded[i + 1:i + 2].isalpha() and encoded[i + 1].isascii()
        if ch == A:
            assert encoded[i + 1:i + 3].isalpha() and encoded[i + 1:i + 3].isascii()
        i += 1


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_round_trip_on_adversarial_strings(text):
    encoded = co.encode_case(text)
    assert co.decode_case(encoded) == text
    assert_canonical(encoded)
    assert co.encode_case(co.decode_case(encoded)) == encoded


ALPHABET = ["a", "b", "Z", "Q", "1", " ", "_", "é", "É", "Ж", "中", "🙂", "\u0301", T, A, C, E]


def test_round_trip_exhaustive_short_strings():
    """Every string of length <= 4 over letters of both cases, a digit, non-ASCII and all four operators:
    decode inverts encode, and no two strings share an encoding."""
    alphabet = ["a", "B", "1", "é", T, A, C, E]
    encodings = set()
    n = 0
    for k in range(5):
        for chars in itertools.product(alphabet, repeat=k):
            text = "".join(chars)
            encoded = co.encode_case(text)
            assert co.decode_case(encoded) == text, repr(text)
            encodings.add(encoded)
            n += 1
    assert len(encodings) == n


def test_round_trip_random_strings():
    rng = random.Random(20240520)
    for _ in range(5000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24)))
        encoded = co.encode_case(text)
        assert co.decode_case(encoded) == text, repr(text)
        assert_canonical(encoded)


def ascii_lower(s):
    return s.translate({c: c + 32 for c in range(65, 91)})


def test_decode_is_total_and_only_deletes_operators_and_recases():
    """On arbitrary strings (e.g. model samples) decode_case never fails, deletes exactly operator_positions
    and changes nothing but ASCII case: the property that makes the byte sidecar exact."""
    rng = random.Random(7)
    for _ in range(5000):
        s = "".join(rng.choice(ALPHABET + [T, A, C, E] * 3) for _ in range(rng.randint(0, 20)))
        removed = set(co.operator_positions(s))
        kept = "".join(ch for i, ch in enumerate(s) if i not in removed)
        decoded = co.decode_case(s)
        assert ascii_lower(decoded) == ascii_lower(kept), repr(s)
        assert len(decoded.encode("utf-8")) == len(s.encode("utf-8")) - 3 * len(removed)


@pytest.mark.skipif(not SHARED_TEXT.exists(), reason="../shared/data not present")
def test_round_trip_on_every_shared_text():
    files = sorted(SHARED_TEXT.glob("*.txt"))
    assert len(files) == 15
    for f in files:
        text = f.read_text(encoding="utf-8")
        encoded = co.encode_case(text)
        assert co.decode_case(encoded) == text, f.name
        assert re.search("[A-Z]", encoded) is None
        assert len(encoded) > len(text)  # every file has capitals


# ---------------------------------------------------------------------------------------------
# Byte attribution with the real CaseOps tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caseops_sp():
    """The CaseOps sp8192 model from ../shared, or skip."""
    if not CASEOPS_MODEL.exists():
        pytest.skip("../shared/data not present")
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(CASEOPS_MODEL))


@pytest.fixture(scope="module")
def plain_sp():
    """The plain sp8192 model from ../shared, or skip."""
    if not SHARED_TOKENIZER.exists():
        pytest.skip("../shared/data not present")
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(SHARED_TOKENIZER))


def paragraphs(name, n, skip=40):
    """n non-empty blank-line blocks of a shared text, after the first `skip`."""
    blocks = [b.strip() for b in (SHARED_TEXT / name).read_text(encoding="utf-8").split("\n\n") if b.strip()]
    return blocks[skip:skip + n]


# Documents whose decoded text is not the normalised original: the normaliser composes a lower-cased ASCII
# letter with a following combining mark that has no upper-case precomposed form (w + ring -> U+1E98).
LOSSY = ["W\u030a", "J\u030c and more"]


def reference_text(plain_sp, doc):
    """The original text as the plain sp8192 pipeline sees it (its bytes are what plain BPB divides by)."""
    return plain_sp.decode(plain_sp.encode(doc))


def test_sidecar_bytes_per_token_rule(caseops_sp, plain_sp):
    surfaces = co.PieceSurfaces(caseops_sp)
    op_ids = {caseops_sp.piece_to_id(ch): ch for ch in OPS}
    assert sorted(op_ids) == [4, 5, 6, 7]
    docs = [d for d in ADVERSARIAL if d.strip()] + paragraphs("python_peps_created_2024.txt", 30) + LOSSY
    for doc in docs:
        ids = co.encode_document(caseops_sp, doc)
        counts = co.original_bytes_per_token(surfaces, ids)
        transformed = caseops_sp.decode(ids)
        original = co.decode_case(transformed)
        assert int(counts.sum()) == len(original.encode("utf-8")), repr(doc)
        if doc in LOSSY:
            assert original != reference_text(plain_sp, doc)
        else:
            assert original == reference_text(plain_sp, doc), repr(doc)
        # per token: surface bytes, except operators acting as operators (0); escaped literals keep 3
        literal = False
        for tok, n in zip(ids, counts.tolist()):
            if tok in op_ids:
                assert n == (3 if literal else 0)
                literal = not literal and op_ids[tok] == E
            else:
                assert n == len(surfaces.surface[tok])
                literal = False
        # locality: every token prefix that ends on a character boundary has the prefix's original bytes
        raw = b""
        for k, tok in enumerate(ids, 1):
            raw += surfaces.surface[tok]
            try:
                prefix = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            assert int(counts[:k].sum()) == len(co.decode_case(prefix).encode("utf-8"))


@pytest.mark.skipif(not SHARED_TEXT.exists(), reason="../shared/data not present")
def test_sidecar_sums_to_original_bytes_on_whole_shared_texts(caseops_sp, plain_sp):
    """Whole books/PEP files as single documents: sidecar sum = bytes of the normalised original text, which
    is also what the plain sp8192 tokenizer's byte tables count."""
    surfaces = co.PieceSurfaces(caseops_sp)
    counter = tg.ByteCounter(tg.build_byte_tables(plain_sp, 8192), CPU)
    for name in ("gutenberg_84_frankenstein.txt", "python_peps_created_2024.txt"):
        doc = (SHARED_TEXT / name).read_text(encoding="utf-8")
        ids = co.encode_document(caseops_sp, doc)
        counts = co.original_bytes_per_token(surfaces, ids)
        plain_ids = plain_sp.encode(doc)
        plain = torch.tensor([tg.BOS_ID] + plain_ids)
        plain_bytes = int(counter.count(plain[:-1], plain[1:]).sum())
        reference = plain_sp.decode(plain_ids)
        assert int(counts.sum()) == len(reference.encode("utf-8")) == plain_bytes
        assert co.decode_case(caseops_sp.decode(ids)) == reference


# ---------------------------------------------------------------------------------------------
# The data tool
# ---------------------------------------------------------------------------------------------


def split_docs(tokens):
    """Per-document token lists (BOS removed) of a BOS-separated stream."""
    starts = np.flatnonzero(tokens == tg.BOS_ID).tolist() + [tokens.size]
    return [tokens[a + 1:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def test_cli_writes_shards_and_a_matching_sidecar(tmp_path, caseops_sp, plain_sp):
    docs = [d for d in ADVERSARIAL if d.strip()][:20] + paragraphs("gutenberg_84_frankenstein.txt", 12)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "out"
    assert co.main(["--model", str(CASEOPS_MODEL), "--out", str(out), "--val-docs", "26", "--shard-tokens", "300",
                    str(src)]) == 0
    val, side = out / "fineweb_val_000000.bin", out / "fineweb_val_bytes_000000.bin"
    assert tg.read_shard_header(val) == tg.read_shard_header(side)
    train_paths = sorted(out.glob("fineweb_train_*.bin"))
    assert len(train_paths) >= 2 and not list(out.glob("fineweb_train_bytes_*"))
    tokens, counts = np.asarray(tg.load_shard(val)), np.asarray(tg.load_shard(side)).astype(np.int64)
    train = np.concatenate([np.asarray(tg.load_shard(p)) for p in train_paths])
    assert int((tokens == 1).sum()) == 26 and int((train == 1).sum()) == len(docs) - 26
    assert (counts[tokens == 1] == 0).all() and tokens[0] == 1
    per_doc = np.split(counts, np.flatnonzero(tokens == 1)[1:])
    decoded = [co.decode_case(caseops_sp.decode(ids)) for ids in split_docs(tokens) + split_docs(train)]
    assert decoded == [reference_text(plain_sp, d) for d in docs]
    assert [int(c.sum()) for c in per_doc] == [len(t.encode("utf-8")) for t in decoded[:26]]


def test_cli_never_overwrites_without_flag_and_removes_stale_shards(tmp_path, caseops_sp, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", ["First Doc", "Second DOC here", "third"])
    out = tmp_path / "out"
    argv = ["--model", str(CASEOPS_MODEL), "--out", str(out), "--val-docs", "1", str(src)]
    assert co.main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    capsys.readouterr()
    assert co.main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    tg.write_shard(out / "fineweb_train_000007.bin", [1, 2, 3])
    assert co.main(argv + ["--overwrite"]) == 0
    assert "fineweb_train_000007.bin" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_errors_name_the_file(tmp_path, caseops_sp, capsys):
    out = str(tmp_path / "out")
    missing = tmp_path / "nope.txt"
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"fine text \xff\xfe broken")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    good = tmp_path / "good.txt"
    good.write_text("Hello", encoding="utf-8")
    cases = [(["--model", str(CASEOPS_MODEL), str(missing)], str(missing)),
             (["--model", str(CASEOPS_MODEL), str(bad_utf8)], str(bad_utf8)),
             (["--model", str(CASEOPS_MODEL), str(bad_json)], f"{bad_json}:2"),
             (["--model", str(tmp_path / "no.model"), str(good)], "no.model")]
    if SHARED_TOKENIZER.exists():
        cases.append((["--model", str(SHARED_TOKENIZER), str(good)], "tokenize_text.py"))
    for argv, words in cases:
        assert co.main(argv + ["--out", out, "--val-docs", "1"]) == 1
        err = capsys.readouterr().err
        assert words in err, err
    assert not list(tmp_path.glob("out/*.bin"))


# ---------------------------------------------------------------------------------------------
# train_gpt.py: sidecar loading, refusals, and the val glob
# ---------------------------------------------------------------------------------------------


def write_val(tmp_path, tokens, counts=None, index=0):
    """fineweb_val_<index>.bin (+ its fineweb_val_bytes_ sidecar when counts is given)."""
    tg.write_shard(tmp_path / f"fineweb_val_{index:06d}.bin", tokens)
    if counts is not None:
        tg.write_shard(tmp_path / f"fineweb_val_bytes_{index:06d}.bin", counts)


def test_val_glob_never_loads_sidecars_as_tokens(tmp_path):
    tokens = np.array([1, 50, 60, 70, 1, 80, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100])
    write_val(tmp_path, tokens, counts=np.where(tokens == 1, 0, 3))
    pattern = str(tmp_path / "fineweb_val_*.bin")
    assert [p.rsplit("/", 1)[-1] for p in tg.val_token_files(pattern)] == ["fineweb_val_000000.bin"]
    assert np.array_equal(tg.load_validation_tokens(pattern, 16).numpy(), tokens)
    with pytest.raises(tg.ConfigError, match="only byte sidecars"):
        tg.load_validation_tokens(str(tmp_path / "fineweb_val_bytes_*.bin"), 16)
    assert tg.sidecar_path(tmp_path / "fineweb_val_000003.bin") == tmp_path / "fineweb_val_bytes_000003.bin"
    with pytest.raises(tg.ConfigError, match="_val_"):
        tg.sidecar_path(tmp_path / "valshard.bin")


@pytest.mark.parametrize("n1,n2,seq", [(50, 31, 16), (40, 25, 16), (33, 0, 16), (100, 1, 10)])
def test_sidecar_truncated_like_val_tokens(tmp_path, n1, n2, seq):
    rng = np.random.default_rng(n1)
    a = np.concatenate([[1], rng.integers(2, 500, n1 - 1)])
    b = rng.integers(2, 500, n2)
    write_val(tmp_path, a, np.where(a == 1, 0, rng.integers(0, 9, n1)), 0)
    write_val(tmp_path, b, rng.integers(1, 9, n2), 1)
    pattern = str(tmp_path / "fineweb_val_*.bin")
    toks, counts = tg.load_validation_tokens(pattern, seq), tg.load_validation_bytes(pattern, seq)
    want = np.concatenate([np.asarray(tg.load_shard(tmp_path / f"fineweb_val_bytes_{i:06d}.bin")) for i in (0, 1)])
    assert counts.numel() == toks.numel() and np.array_equal(counts.numpy(), want[:toks.numel()])


@pytest.mark.parametrize("kind", ["missing", "short", "long", "magic", "bos"])
def test_bad_sidecars_raise_config_error_naming_the_file(tmp_path, kind):
    tokens = np.concatenate([[1], np.arange(2, 40)])
    counts = {"missing": None, "short": np.ones(38), "long": np.ones(40)}.get(kind, np.where(tokens == 1, 0, 2))
    if kind == "bos":
        counts = np.full(39, 2)
    write_val(tmp_path, tokens, counts)
    side = tmp_path / "fineweb_val_bytes_000000.bin"
    if kind == "magic":
        raw = bytearray(side.read_bytes())
        raw[0] ^= 1
        side.write_bytes(bytes(raw))
    with pytest.raises(tg.ConfigError) as exc:
        tg.load_validation_bytes(str(tmp_path / "fineweb_val_*.bin"), 16)
    assert str(side) in str(exc.value)
    if kind != "magic":
        assert "data/caseops.py" in str(exc.value)


def test_sidecar_counter_reproduces_byte_counter_bpb(cpu_runtime):
    """A sidecar holding ByteCounter's own counts gives bit-identical sums through score_windows (sliding and
    plain eval): the position plumbing is right and the default path is unchanged."""
    cfg = tiny_config(eval_seq_len=16, eval_stride=4, eval_batch_seqs=4)
    tokens = ph.random_val_tokens(160, 64, seed=11)
    tables = ph.random_byte_tables(64, seed=12)
    plain = tg.ByteCounter(tables, CPU)
    sidecar = torch.cat([torch.zeros(1, dtype=torch.int64), plain.count(tokens[:-1], tokens[1:])])
    side = tg.SidecarByteCounter(sidecar, CPU)
    nll = lambda x, y, looped: ((x * 7 + y * 13) % 29).float() / 7 + 0.05
    for fn in (tg.eval_sliding, tg.eval_plain):
        assert fn(cfg, cpu_runtime, nll, tokens, side, False) == fn(cfg, cpu_runtime, nll, tokens, plain, False)
    # a sidecar that differs at one target position changes the byte total by exactly that difference
    sidecar[77] += 5
    sums = [torch.zeros(3, dtype=torch.float64) for _ in range(2)]
    ws, lo, hi = tg.sliding_windows(160, 16, 4)
    for counter, s in ((plain, sums[0]), (tg.SidecarByteCounter(sidecar, CPU), sums[1])):
        tg.score_windows(cfg, cpu_runtime, nll, tokens, counter, False, ws, lo, hi, s)
    assert sums[1][2] - sums[0][2] == 5 and sums[1][0] == sums[0][0]


def test_caseops_config_field():
    assert tg.load_config({}).caseops == "auto" and tg.load_config({"CASEOPS": "1"}).caseops == "1"
    for value in ("auto", "0", "1"):
        tg.validate_config(dataclasses.replace(tiny_config(), caseops=value), 1)
    with pytest.raises(tg.ConfigError, match="CASEOPS"):
        tg.validate_config(dataclasses.replace(tiny_config(), caseops="yes"), 1)


def test_header_dump_lists_caseops(tmp_path, cpu_runtime):
    cfg = dataclasses.replace(tiny_config(), log_dir=str(tmp_path), run_id="hdr")
    log = tg.Logger(cfg, cpu_runtime)
    tg.log_header(cfg, cpu_runtime, log, "t", "v", "k")
    assert "  caseops: auto\n" in log.path.read_text()


def caseops_cfg(tmp_path, tokenizer, **kw):
    """A config reading tmp_path/fineweb_val_*.bin with the given tokenizer (vocab 8192, no count check)."""
    return dataclasses.replace(tiny_config(vocab_size=8192), preset="record", expected_val_tokens=0,
                               val_files=str(tmp_path / "fineweb_val_*.bin"), tokenizer_path=str(tokenizer), **kw)


def test_trainer_refuses_caseops_tokenizer_without_a_matching_sidecar(tmp_path, caseops_sp, cpu_runtime):
    tokens = np.concatenate([[1], np.arange(100, 140)])
    write_val(tmp_path, tokens)
    side = tmp_path / "fineweb_val_bytes_000000.bin"
    cfg = caseops_cfg(tmp_path, CASEOPS_MODEL)
    with pytest.raises(tg.ConfigError) as exc:
        tg.prepare_data(cfg, cpu_runtime, quiet)
    assert str(side) in str(exc.value) and "data/caseops.py" in str(exc.value)
    tg.write_shard(side, np.ones(tokens.size - 1))
    with pytest.raises(tg.ConfigError) as exc:
        tg.prepare_data(cfg, cpu_runtime, quiet)
    assert str(side) in str(exc.value) and "40 entries" in str(exc.value)
    tg.write_shard(side, np.where(tokens == 1, 0, 2))
    log = Recorder()
    *_, counter, val = tg.prepare_data(cfg, cpu_runtime, log)
    assert isinstance(counter, tg.SidecarByteCounter) and val.numel() == 33
    assert "caseops: 1 (CASEOPS=auto)" in log and "val_docs: 1" in log
    assert "bytes_sidecar: files:1 scored_bytes:64 bytes_per_token:2.0000" in log
    log = Recorder()
    *_, counter, _ = tg.prepare_data(dataclasses.replace(cfg, caseops="0"), cpu_runtime, log)
    assert isinstance(counter, tg.ByteCounter) and any(line.startswith("WARNING: CASEOPS=0") for line in log)


def test_plain_tokenizer_is_not_caseops_unless_forced(tmp_path, plain_sp, cpu_runtime):
    tokens = np.concatenate([[1], np.arange(300, 340)])
    write_val(tmp_path, tokens)
    log = Recorder()
    *_, counter, _ = tg.prepare_data(caseops_cfg(tmp_path, SHARED_TOKENIZER), cpu_runtime, log)
    assert isinstance(counter, tg.ByteCounter) and "caseops: 0 (CASEOPS=auto)" in log
    with pytest.raises(tg.ConfigError, match="fineweb_val_bytes_000000.bin"):
        tg.prepare_data(caseops_cfg(tmp_path, SHARED_TOKENIZER, caseops="1"), cpu_runtime, quiet)


# ---------------------------------------------------------------------------------------------
# End to end: BPB through the evaluation path equals NLL / (ln 2 * bytes of the original documents)
# ---------------------------------------------------------------------------------------------


def test_bpb_with_sidecar_equals_nll_over_original_document_bytes(tmp_path, caseops_sp, plain_sp, cpu_runtime):
    L = 16
    candidates = (paragraphs("gutenberg_84_frankenstein.txt", 25) + paragraphs("python_peps_created_2024.txt", 25)
                  + [d for d in ADVERSARIAL if d.strip()])
    rng = random.Random(3)
    rng.shuffle(candidates)
    # a prefix of documents whose stream (BOS + tokens each) has N with (N - 1) % L == 0: nothing is truncated
    n_tokens, k = 0, None
    for i, doc in enumerate(candidates):
        n_tokens += 1 + len(co.encode_document(caseops_sp, doc))
        if i >= 30 and (n_tokens - 1) % L == 0:
            k = i + 1
            break
    assert k is not None
    docs = candidates[:k]
    assert co.main(["--model", str(CASEOPS_MODEL), "--out", str(tmp_path), "--val-docs", str(k),
                    str(write_jsonl(tmp_path / "docs.jsonl", docs))]) == 0
    cfg = caseops_cfg(tmp_path, CASEOPS_MODEL, eval_seq_len=L, eval_stride=4, eval_batch_seqs=32)
    *_, counter, val = tg.prepare_data(cfg, cpu_runtime, quiet)
    assert isinstance(counter, tg.SidecarByteCounter) and val.numel() == n_tokens
    # independent byte count: the documents as the plain sp8192 pipeline decodes them
    original_bytes = sum(len(reference_text(plain_sp, d).encode("utf-8")) for d in docs)
    denom = math.log(2) * original_bytes
    scored = n_tokens - 1
    # 1) a fixed per-token NLL, summed directly
    nll = lambda x, y, looped: ((x * 31 + y * 17) % 97).float() / 10 + 0.1
    direct = float(nll(val[:-1], val[1:], False).double().sum())
    for fn in (tg.eval_sliding, tg.eval_plain):
        loss, bpb = fn(cfg, cpu_runtime, nll, val, counter, False)
        assert loss == pytest.approx(direct / scored, rel=1e-12)
        assert bpb == pytest.approx(direct / denom, rel=1e-12)
    # 2) a real (tiny, random) model through eval_sliding, with its per-position NLLs
    model = ph.perturbed_model(cfg, cpu_runtime, seed=5).eval()
    per_position = np.zeros(scored)
    loss, bpb = tg.eval_sliding(cfg, cpu_runtime, model.token_nll, val, counter, True, per_position=per_position)
    assert per_position.min() > 0
    assert loss == pytest.approx(per_position.sum() / scored, rel=1e-9)
    assert bpb == pytest.approx(per_position.sum() / denom, rel=1e-9)
