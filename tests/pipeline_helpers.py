"""Helpers shared by test_export.py and test_eval.py: perturbed tiny models, hand-built byte tables,
a once-per-session smoke dataset, and subprocess runs of train_gpt.py with a tiny smoke-like config.

The smoke dataset and the tiny pipeline run are cached at module level, so every test module of one
pytest session reuses them (the main engineer may move these into conftest.py later).
"""
import glob
import math
import re
from pathlib import Path

import numpy as np
import torch

from conftest import ROOT, tg
from conftest import run_script as conftest_run_script

SCRIPT = ROOT / "train_gpt.py"

# A tiny model on the smoke data that still exercises loops, XSA, parallel residuals, GPTQ, sliding and
# TTT (4 chunks over a 2048-token validation stream). One thread: on a loaded 2-core box OpenMP
# spinning makes 2-thread runs of tiny models ~10x slower.
TINY_RUN_ENV = {
    "PRESET": "smoke", "ITERATIONS": "6", "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "1",
    "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1", "GPTQ_CALIBRATION_BATCHES": "1",
    "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "LOOP_START": "1",
    "LOOP_END": "1", "PARALLEL_RESIDUAL_START": "2", "XSA_LAST_N": "2",
    "TRAIN_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "1024", "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "64",
    "EVAL_BATCH_SEQS": "8", "TTT_ENABLED": "1", "SLIDING_WINDOW_ENABLED": "1", "TTT_CHUNK_TOKENS": "512",
    "TTT_EPOCHS": "2", "TTT_LR": "0.05", "PROGRESS_SECONDS": "0",
}
SMALL_VAL_TOKENS = 2048  # scored positions in the small validation shard (4 TTT chunks of 512)

_CACHE = {}


# ---------------------------------------------------------------------------------------------
# In-process helpers
# ---------------------------------------------------------------------------------------------


def perturbed_model(cfg, rt, seed=0):
    """build_model(cfg) with every parameter re-drawn from small random normals under `seed`.

    At init the output projections are zero (blocks are the identity); this gives a non-trivial model.
    """
    model = tg.build_model(cfg, rt)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name == "tok_emb.weight":
                p.copy_(0.5 * noise)
            elif p.ndim == 2 and name.startswith("blocks."):
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.add_(0.1 * noise)
    model.eval()
    return model


def random_byte_tables(vocab, seed=0):
    """Hand-built (base int16, space bool, boundary bool) tables; BOS (id 1) and id 0 are boundaries."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 5, size=vocab).astype(np.int16)
    space = rng.random(vocab) < 0.4
    boundary = rng.random(vocab) < 0.1
    boundary[[0, 1]] = True
    base[[0, 1]] = 0
    space[[0, 1]] = False
    return base, space, boundary


def random_val_tokens(total, vocab, seed=0, bos_every=37):
    """total+1 random token ids (int64 CPU tensor) with BOS=1 at the start and every `bos_every` tokens."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(2, vocab, size=total + 1)
    toks[::bos_every] = tg.BOS_ID
    return torch.from_numpy(toks.astype(np.int64))


def byte_counts_by_hand(tables, prev, target):
    """Independent numpy byte count: base[t] + (space[t] and not boundary[prev])."""
    base, space, boundary = tables
    prev, target = np.asarray(prev), np.asarray(target)
    return base[target].astype(np.int64) + (space[target] & ~boundary[prev]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Subprocess pipeline helpers
# ---------------------------------------------------------------------------------------------


def run_script(script, env_extra, cwd, args=(), timeout=600):
    """Run `python3 script args` (one thread, clean env); assert success and return the CompletedProcess."""
    proc = conftest_run_script(env_extra, Path(cwd), script=script, args=args, timeout=timeout)
    assert proc.returncode == 0, f"{script} {args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def write_shard_by_hand(path, tokens):
    """A FineWeb-format shard written independently of train_gpt: 256 int32 header + uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def smoke_data(factory):
    """(data_dir, small_val_file, tokenizer_path) for the smoke preset, built once per session."""
    if "data" not in _CACHE:
        root = factory.mktemp("smoke_data")
        cfg = tg.load_config({"PRESET": "smoke", "DATA_DIR": str(root)})
        tg.build_default_data(cfg, lambda *a, **k: None)
        _train, val_glob, tok_path = tg.data_paths(cfg)
        _CACHE["data"] = (root, val_prefix(root, val_glob, SMALL_VAL_TOKENS, "small_val"), Path(tok_path))
    return _CACHE["data"]


def val_prefix(root, val_glob, tokens, name):
    """Write root/name/fineweb_val_000000.bin holding the first `tokens` scored positions (+1) of the val shard."""
    val = np.fromfile(sorted(glob.glob(val_glob))[0], dtype="<u2", offset=1024)
    assert val[0] == tg.BOS_ID and val.size > tokens + 1
    path = Path(root) / name / "fineweb_val_000000.bin"
    write_shard_by_hand(path, val[:tokens + 1])
    return path


def tiny_run_env(data_dir, small_val, run_dir, run_id):
    """Env for one tiny pipeline run writing its log/summary/artifact under run_dir."""
    return dict(TINY_RUN_ENV, DATA_DIR=data_dir, VAL_FILES=small_val, LOG_DIR=run_dir,
                ARTIFACT_PATH=Path(run_dir) / "model.ptz", RUN_ID=run_id)


def tiny_pipeline(factory):
    """The source script's tiny pipeline run (cached): dict(log, stdout, artifact, dir, env)."""
    if "tiny" not in _CACHE:
        data_dir, small_val, _ = smoke_data(factory)
        run_dir = factory.mktemp("tiny_source_run")
        env = tiny_run_env(data_dir, small_val, run_dir, "tiny_source")
        proc = run_script(SCRIPT, env, cwd=run_dir)
        _CACHE["tiny"] = dict(log=(run_dir / "tiny_source.txt").read_text(), stdout=proc.stdout,
                              artifact=run_dir / "model.ptz", dir=run_dir, env=env)
    return _CACHE["tiny"]


# ---------------------------------------------------------------------------------------------
# Log parsing
# ---------------------------------------------------------------------------------------------


def train_losses(log):
    """[(step, 'loss string')] of every logged training step."""
    return re.findall(r"^(\d+)/\d+ train_loss: (\S+)", log, flags=re.M)


def metric(log, name):
    """(val_loss, val_bpb) strings of the unique `<name> val_loss:X val_bpb:Y` line."""
    found = re.findall(rf"^{re.escape(name)} val_loss:(\S+) val_bpb:(\S+)", log, flags=re.M)
    assert len(found) == 1, f"expected one '{name}' line, found {found}"
    return found[0]


def legality_lines(log):
    """[(positions, scored_exactly_once, score_before_update)] of every legality line."""
    return re.findall(r"^legality: positions=(\d+) scored_exactly_once=(\w+) score_before_update=(\w+)$",
                      log, flags=re.M)


def pack_with_env(env, out_dir):
    """`python3 train_gpt.py pack OUT` under `env` (a run's settings): (path, printed byte count, source text)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "train_gpt.py"
    proc = run_script(SCRIPT, env, cwd=out_dir, args=("pack", str(out)))
    m = re.search(r"wrote (.+): (\d+) bytes \(source (\d+) bytes\) for ", proc.stdout)
    assert m and Path(m.group(1)) == out, proc.stdout
    return out, int(m.group(2)), SCRIPT.read_text(encoding="utf-8")
