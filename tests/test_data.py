"""Data tests: shard format and errors, the global sequence sampler, world-size invariant loading,
validation truncation, and exact BPB byte accounting on real and freshly trained tokenizers."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_TEXT, tg, tiny_config

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------


def test_shard_round_trip_and_layout(tmp_path):
    tokens = np.array([1, 0, 65535, 7, 8192, 1, 300], dtype=np.int64)
    path = tmp_path / "sub" / "fineweb_val_000000.bin"
    tg.write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = struct.unpack("<256i", raw[:1024])
    assert header[:3] == (20240520, 1, len(tokens)) and not any(header[3:])
    assert struct.unpack(f"<{len(tokens)}H", raw[1024:]) == tuple(tokens)
    assert tg.read_shard_header(path) == len(tokens)
    loaded = tg.load_shard(path)
    assert loaded.dtype == np.uint16 and np.array_equal(np.asarray(loaded), tokens)
    with pytest.raises(ValueError, match="65536"):
        tg.write_shard(tmp_path / "big.bin", [1, 65536])


def corrupt(path, kind):
    raw = bytearray(path.read_bytes())
    if kind == "magic":
        raw[0:4] = struct.pack("<i", 20240521)
    elif kind == "version":
        raw[4:8] = struct.pack("<i", 2)
    elif kind == "truncated":
        raw = raw[:-3]
    elif kind == "padded":
        raw += b"\0\0"
    elif kind == "short":
        raw = raw[:1000]
    elif kind == "count":
        raw[8:12] = struct.pack("<i", 99)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind,words", [("magic", "magic"), ("version", "version"), ("truncated", "truncated"),
                                        ("padded", "bytes"), ("short", "shorter"), ("count", "99")])
def test_bad_shards_raise_config_error_naming_the_file(tmp_path, kind, words):
    path = tmp_path / f"fineweb_train_{kind}.bin"
    tg.write_shard(path, np.arange(50))
    corrupt(path, kind)
    with pytest.raises(tg.ConfigError) as exc:
        tg.read_shard_header(path)
    assert str(path) in str(exc.value) and words in str(exc.value)
    with pytest.raises(tg.ConfigError):
        tg.load_shard(path)


def test_resolve_files_sorted_and_empty_glob(tmp_path):
    for name in ("fineweb_train_000002.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin"):
        tg.write_shard(tmp_path / name, [1, 2])
    files = tg.resolve_files(str(tmp_path / "fineweb_train_*.bin"), "train")
    assert [Path(f).name for f in files] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    pattern = str(tmp_path / "nothing_*.bin")
    with pytest.raises(tg.ConfigError) as exc:
        tg.resolve_files(pattern, "val")
    assert "VAL_FILES" in str(exc.value) and "DATA_DIR" in str(exc.value) and pattern in str(exc.value)


# ------------------------------------------------------------------------------------------------
# GlobalSequenceSampler
# ------------------------------------------------------------------------------------------------

SIZES = [1000, 537, 2049, 40, 65, 300]
L = 64


def valid_starts(n, phase):
    """All starts phase + k*L whose L+1 tokens fit in a shard of n tokens."""
    return {phase + k * L for k in range((n - 1 - phase) // L)}


def draw_pass(sampler):
    """One full pass (as many draws as there are sequences in the current permutation)."""
    return sampler.draw(int(sum(sampler.count)))


def check_pass(draws):
    """A pass visits every valid start of every shard exactly once, on one phase per shard."""
    assert len(set(draws)) == len(draws), "a start repeated within one pass"
    by_shard = {}
    for shard, start in draws:
        assert start + L + 1 <= SIZES[shard]
        by_shard.setdefault(shard, set()).add(start)
    for shard, n in enumerate(SIZES):
        starts = by_shard.get(shard, set())
        if n < L + 1:
            assert not starts
            continue
        phases = {s % L for s in starts}
        assert len(phases) == 1, f"shard {shard}: starts on several phases {phases}"
        phase = phases.pop()
        assert phase <= min(L - 1, n - L - 1)
        assert starts == valid_starts(n, phase)


def test_sampler_passes_are_permutations_of_all_valid_starts():
    sampler = tg.GlobalSequenceSampler(SIZES, L, seed=3)
    passes = [draw_pass(sampler) for _ in range(3)]
    for p in passes:
        check_pass(p)
    assert passes[0] != passes[1] and passes[1] != passes[2]  # reshuffled between passes
    # draws do not need to align with passes: n draws at a time give the same stream
    other = tg.GlobalSequenceSampler(SIZES, L, seed=3)
    chunked = [d for _ in range(len(passes[0]) * 3 // 7 + 1) for d in other.draw(7)]
    flat = [d for p in passes for d in p]
    assert chunked[:len(flat)] == flat[:len(chunked)]


def test_sampler_is_deterministic_per_seed():
    a = tg.GlobalSequenceSampler(SIZES, L, seed=5).draw(100)
    b = tg.GlobalSequenceSampler(SIZES, L, seed=5).draw(100)
    c = tg.GlobalSequenceSampler(SIZES, L, seed=6).draw(100)
    assert a == b and a != c


def test_sampler_picks_shards_proportionally_to_remaining():
    sizes = [10 * L + 1, 30 * L + 1]  # phase 0 -> 10 and 30 sequences; any other phase -> 9 and 29
    first = [tg.GlobalSequenceSampler(sizes, L, seed=s).draw(1)[0][0] for s in range(600)]
    share = np.mean(first)
    assert 0.68 < share < 0.82, share  # expected ~0.75


def test_sampler_phase_range_uses_every_allowed_phase_and_no_other():
    """phase in [0, min(L-1, n-L-1)] (uniform): a 100-token shard allows phases 0..35 and always >= 1 sequence."""
    n = 100
    phases = set()
    for seed in range(400):
        sampler = tg.GlobalSequenceSampler([n], L, seed=seed)
        (shard, start), = sampler.draw(1)
        assert shard == 0 and start + L + 1 <= n
        phases.add(start)
    assert phases == set(range(0, n - L - 1 + 1))


def test_sampler_rejects_shards_without_a_full_sequence():
    with pytest.raises(tg.ConfigError):
        tg.GlobalSequenceSampler([10, L], L, seed=0)


# ------------------------------------------------------------------------------------------------
# TrainLoader
# ------------------------------------------------------------------------------------------------


def positional_shards(tmp_path, sizes=(700, 333, 1200)):
    """Shard k holds tokens 10000*k + position, so every token says where it came from."""
    files = []
    for k, n in enumerate(sizes):
        path = tmp_path / f"fineweb_train_{k:06d}.bin"
        tg.write_shard(path, 10000 * k + np.arange(n))
        files.append(str(path))
    return files, sizes


@pytest.mark.parametrize("world", [2, 4])
def test_train_loader_is_world_size_invariant(tmp_path, world):
    cfg = tiny_config(train_seq_len=16, train_batch_tokens=16 * 8, grad_accum_base=4, data_seed=7)
    files, sizes = positional_shards(tmp_path)
    single = tg.TrainLoader(cfg, tg.Runtime(device=CPU), files)
    ranks = [tg.TrainLoader(cfg, tg.Runtime(device=CPU, rank=r, world_size=world), files) for r in range(world)]
    assert single.accum_steps == 4 and all(r.accum_steps == 4 // world for r in ranks)
    for _ in range(4):
        ref = single.next_batch()
        per_rank = [r.next_batch() for r in ranks]
        merged = [per_rank[s % world][s // world] for s in range(4)]  # slice s = m*world + r
        assert len(ref) == 4
        for (x1, y1), (x2, y2) in zip(ref, merged):
            assert x1.shape == (2, 16) and x1.dtype == torch.int64
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
            assert torch.equal(x1[:, 1:], y1[:, :-1])
            # each row is L+1 consecutive tokens of one shard
            full = torch.cat([x1, y1[:, -1:]], dim=1)
            assert torch.all(full[:, 1:] - full[:, :-1] == 1)
            shard = full[:, 0] // 10000
            assert torch.equal(full[:, -1] // 10000, shard)
            assert all(int(full[i, -1]) % 10000 < sizes[int(shard[i])] for i in range(full.size(0)))


def test_train_loader_rows_differ_within_a_batch(tmp_path):
    cfg = tiny_config(train_seq_len=16, train_batch_tokens=16 * 8, grad_accum_base=2)
    files, _ = positional_shards(tmp_path)
    batch = tg.TrainLoader(cfg, tg.Runtime(device=CPU), files).next_batch()
    firsts = [int(v) for x, _ in batch for v in x[:, 0]]
    assert len(set(firsts)) == len(firsts) == 8


# ------------------------------------------------------------------------------------------------
# Validation tokens
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n1,n2,seq", [(50, 31, 16), (40, 25, 16), (33, 0, 16), (100, 1, 10)])
def test_validation_tokens_truncation(tmp_path, n1, n2, seq):
    rng = np.random.default_rng(n1)
    a = np.concatenate([[1], rng.integers(2, 500, n1 - 1)])
    b = rng.integers(2, 500, n2)
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", a)
    tg.write_shard(tmp_path / "fineweb_val_000001.bin", b)
    toks = tg.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), seq)
    n = n1 + n2
    want_len = ((n - 1) // seq) * seq + 1
    assert toks.dtype == torch.int64 and toks.numel() == want_len
    assert np.array_equal(toks.numpy(), np.concatenate([a, b])[:want_len])


def test_validation_tokens_errors(tmp_path):
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(2, 60))
    with pytest.raises(tg.ConfigError, match="BOS"):
        tg.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 16)
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", [1] + [5] * 10)
    with pytest.raises(tg.ConfigError, match="fewer than 17"):
        tg.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 16)
    with pytest.raises(tg.ConfigError, match="VAL_FILES"):
        tg.load_validation_tokens(str(tmp_path / "missing_*.bin"), 16)


# ------------------------------------------------------------------------------------------------
# BPB byte accounting
# ------------------------------------------------------------------------------------------------

EXTRA_TEXTS = ["naïve café — 東京 🙂 ﬁne ½ e\u0301 Ω", "  leading spaces\tand\ttabs\n\n\nnew lines  ",
               "numbers 1234567890 and 3.14159, x=[1,2,3]"]


def real_text_samples(max_files=4, chunk=3000):
    """A few KB from several of ../shared/data/text, cut at line boundaries, plus awkward strings."""
    files = sorted(SHARED_TEXT.glob("*.txt"))[::4][:max_files] if SHARED_TEXT.exists() else []
    out = []
    for f in files:
        raw = f.read_text(encoding="utf-8", errors="replace")
        mid = len(raw) // 2
        out.append(raw[mid:mid + chunk].split("\n", 1)[-1])
    return out + EXTRA_TEXTS


def assert_byte_sums_exact(sp, vocab_size, docs):
    counter = tg.ByteCounter(tg.build_byte_tables(sp, vocab_size), CPU)
    total = 0
    for doc in docs:
        ids = sp.encode(doc)
        seq = torch.tensor([tg.BOS_ID] + ids)
        counted = int(counter.count(seq[:-1], seq[1:]).sum())
        assert counted == len(sp.decode(ids).encode("utf-8")), doc[:60]
        total += counted
    # whole documents concatenated in one stream (as in a shard) count the same
    stream = torch.tensor([t for doc in docs for t in [tg.BOS_ID] + sp.encode(doc)])
    assert int(counter.count(stream[:-1], stream[1:]).sum()) == total
    return counter


def check_table_rules(sp, vocab_size):
    base, space, boundary = tg.build_byte_tables(sp, vocab_size)
    n = sp.get_piece_size()
    assert len(base) == len(space) == len(boundary) == max(n, vocab_size)
    assert base.dtype == np.int16 and space.dtype == bool and boundary.dtype == bool
    for i in range(4):  # pad/bos/eos/unk
        assert sp.is_control(i) or sp.is_unknown(i)
        assert base[i] == 0 and boundary[i] and not space[i]
    byte_ids = [i for i in range(n) if sp.is_byte(i)]
    assert len(byte_ids) == 256
    assert all(base[i] == 1 and not boundary[i] and not space[i] for i in byte_ids)
    n_words = 0
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i):
            continue
        assert not boundary[i]
        if piece.startswith("\u2581"):
            assert space[i] and base[i] == len(piece[1:].encode("utf-8"))
            n_words += piece[1:].isalpha()
        else:
            assert not space[i] and base[i] == len(piece.encode("utf-8"))
    assert n_words > 10
    space_id = sp.piece_to_id("\u2581")
    assert space_id != sp.unk_id() and base[space_id] == 0 and space[space_id]
    return base, space, boundary


def assert_leading_space_rule(counter, word_id, word_bytes):
    """A '▁word' target costs its space byte after a normal token, not after BOS/control tokens."""
    prev = torch.tensor([tg.BOS_ID, 0, 2, word_id, 300])
    got = counter.count(prev, torch.full((5,), word_id)).tolist()
    assert got == [word_bytes, word_bytes, word_bytes, word_bytes + 1, word_bytes + 1]


def test_byte_tables_and_counts_on_real_sp8192(shared_tokenizer):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(shared_tokenizer))
    assert sp.get_piece_size() == 8192
    base, space, boundary = check_table_rules(sp, 8192)
    the = sp.piece_to_id("\u2581the")
    assert the != sp.unk_id() and space[the] and base[the] == 3
    assert_leading_space_rule(tg.ByteCounter((base, space, boundary), CPU), the, 3)
    docs = real_text_samples()
    assert len(docs) >= 7
    assert_byte_sums_exact(sp, 8192, docs)
    # tables longer than the vocabulary pad with boundary/zero-byte entries
    b2, s2, bd2 = tg.build_byte_tables(sp, 8200)
    assert len(b2) == 8200 and b2[8192:].sum() == 0 and bd2[8192:].all() and not s2[8192:].any()


@pytest.fixture(scope="module")
def small_sp(tmp_path_factory):
    """A 400-piece BPE model trained with the record's settings on ~200 KB of stdlib source."""
    import sentencepiece as spm
    docs = tg.smoke_corpus_documents(2_000_000)  # see test_smoke_corpus_small_budget for why not 200_000
    picked, size = [], 0
    for d in docs[::4]:
        picked.append(d)
        size += len(d)
        if size >= 200_000:
            break
    lines = [ln for d in picked for ln in d.splitlines() if ln.strip()]
    path = tmp_path_factory.mktemp("sp") / "small_400.model"
    tg.train_sentencepiece(lines, path, 400)
    return spm.SentencePieceProcessor(model_file=str(path)), docs


def test_byte_counts_with_a_freshly_trained_tokenizer(small_sp):
    sp, docs = small_sp
    assert sp.get_piece_size() <= 400 and sp.bos_id() == tg.BOS_ID
    base, space, boundary = check_table_rules(sp, 400)
    words = [i for i in range(sp.get_piece_size())
             if sp.id_to_piece(i).startswith("\u2581") and sp.id_to_piece(i)[1:].isalpha()]
    word = max(words, key=lambda i: len(sp.id_to_piece(i)))
    n_bytes = len(sp.id_to_piece(word)) - 1
    assert n_bytes >= 2 and space[word] and base[word] == n_bytes
    assert_leading_space_rule(tg.ByteCounter((base, space, boundary), CPU), word, n_bytes)
    held_out = [d[:4000] for d in docs[1::9][:5]]
    assert_byte_sums_exact(sp, 400, held_out + real_text_samples(max_files=2, chunk=2000))


def test_build_byte_tables_requires_standalone_space_piece():
    class NoSpaceSP:
        pieces = ["<pad>", "<s>", "</s>", "<unk>", "a", "\u2581b"]

        def get_piece_size(self):
            return len(self.pieces)

        def is_control(self, i):
            return i in (0, 1, 2)

        def is_unknown(self, i):
            return i == 3

        def is_unused(self, i):
            return False

        def is_byte(self, i):
            return False

        def id_to_piece(self, i):
            return self.pieces[i]

        def piece_to_id(self, p):
            return self.pieces.index(p) if p in self.pieces else 3

        def unk_id(self):
            return 3

    with pytest.raises(tg.ConfigError, match="\u2581"):
        tg.build_byte_tables(NoSpaceSP(), 6)
    NoSpaceSP.pieces = NoSpaceSP.pieces + ["\u2581"]
    base, space, boundary = tg.build_byte_tables(NoSpaceSP(), 8)
    assert base.tolist() == [0, 0, 0, 0, 1, 1, 0, 0] and space.tolist() == [0, 0, 0, 0, 0, 1, 1, 0]
    assert boundary.tolist() == [1, 1, 1, 1, 0, 0, 0, 1]


def test_smoke_corpus_small_budget():
    docs = tg.smoke_corpus_documents(200_000)
    assert sum(len(d.encode("utf-8")) for d in docs) >= 200_000


def test_record_preset_refuses_a_partial_validation_set(tmp_path, shared_tokenizer, cpu_runtime):
    """With the real sp8192 tokenizer, a val split that is not the published 40,540,160 tokens is refused
    (naming EXPECTED_VAL_TOKENS); EXPECTED_VAL_TOKENS=0 accepts it."""
    tokens = np.concatenate([[1], np.arange(5000) % 8000 + 100])
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    cfg = tg.Hyperparameters(val_files=str(tmp_path / "fineweb_val_*.bin"), tokenizer_path=str(shared_tokenizer))
    with pytest.raises(tg.ConfigError, match="EXPECTED_VAL_TOKENS"):
        tg.prepare_data(cfg, cpu_runtime, lambda *a, **k: None)
    cfg.expected_val_tokens = 0
    *_, val = tg.prepare_data(cfg, cpu_runtime, lambda *a, **k: None)
    assert val.numel() - 1 == (len(tokens) - 1) // 2048 * 2048


# ------------------------------------------------------------------------------------------------
# The smoke data builder never touches what the user owns
# ------------------------------------------------------------------------------------------------


def tree_digest(root):
    """{relative path: sha256} of every file under root."""
    import hashlib
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_smoke_run_with_user_train_files_writes_nothing_and_names_the_fix(tmp_path):
    """The reported case: PRESET=smoke TRAIN_FILES=<user dir> on a fresh clone. The user's directory stays
    byte-identical, DATA_DIR stays empty, and the run fails with one line naming VAL_FILES/TOKENIZER_PATH."""
    from conftest import run_script
    user = tmp_path / "user_data"
    tg.write_shard(user / "fineweb_train_000000.bin", np.arange(5000) % 1000)
    before = tree_digest(user)
    data_dir = tmp_path / "fresh_data"
    proc = run_script({"PRESET": "smoke", "DATA_DIR": data_dir, "TRAIN_FILES": user / "fineweb_train_*.bin",
                       "RUN_ID": "named"}, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "TRAIN_FILES set" in proc.stderr and "VAL_FILES" in proc.stderr and "TOKENIZER_PATH" in proc.stderr
    assert tree_digest(user) == before
    assert not data_dir.exists() or tree_digest(data_dir) == {}


def test_smoke_builder_refuses_partial_default_data_without_overwriting(tmp_path):
    """A leftover file in the default location is never replaced: the builder stops and says what to delete."""
    cfg = tg.load_config({"PRESET": "smoke", "DATA_DIR": str(tmp_path)})
    _, _, tok_path = tg.data_paths(cfg)
    Path(tok_path).parent.mkdir(parents=True)
    Path(tok_path).write_bytes(b"the user's own file")
    with pytest.raises(tg.ConfigError, match="incomplete smoke data.*delete"):
        tg.build_default_data(cfg, lambda *a, **k: None)
    assert Path(tok_path).read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [Path(tok_path).name]


def test_smoke_builder_reuses_complete_data_untouched(smoke_data_dir):
    """A second call on complete smoke data changes no byte and no modification time."""
    cfg = tg.load_config({"PRESET": "smoke", "DATA_DIR": str(smoke_data_dir)})
    files = [p for p in Path(smoke_data_dir).rglob("*") if p.is_file()]
    stamps = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files}
    digest = tree_digest(smoke_data_dir)
    tg.build_default_data(cfg, lambda *a, **k: None)
    assert tree_digest(smoke_data_dir) == digest
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files} == stamps
    assert not list(Path(smoke_data_dir).glob(".data_build_*"))  # the temporary build folder is gone
