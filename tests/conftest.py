"""Shared pytest fixtures: the train_gpt module, tiny configs, a CPU runtime and optional shared data."""
import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SHARED_TOKENIZER = SHARED / "tokenizers" / "fineweb_8192_bpe.model"
SHARED_TEXT = SHARED / "text"


def tiny_config(**overrides):
    """A tiny model config with every architectural feature on (loops, XSA, parallel, gated skips)."""
    base = dict(tg.SMOKE_PRESET)
    base.update(preset="smoke", vocab_size=64, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2,
                rope_dims=4, xsa_last_n=3, parallel_residual_start=3, loop_start=1, loop_end=2, num_loops=1,
                train_seq_len=16, train_batch_tokens=128, grad_accum_base=2, eval_seq_len=16, eval_stride=4,
                eval_batch_seqs=4, ttt_chunk_tokens=32, quant_min_numel=256, qk_gain_init=1.5)
    base.update(overrides)
    return tg.Hyperparameters(**base)


@pytest.fixture
def cpu_runtime():
    """Single-process float32 CPU runtime with SDPA attention and no compile."""
    return tg.Runtime(device=torch.device("cpu"))


@pytest.fixture
def shared_tokenizer():
    """Path to the real FineWeb sp8192 model from ../shared, or skip when absent."""
    if not SHARED_TOKENIZER.exists():
        pytest.skip("../shared/data not present")
    return SHARED_TOKENIZER


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch):
    """Tests never inherit run configuration from the caller's environment."""
    for f in dataclasses.fields(tg.Hyperparameters):
        monkeypatch.delenv(f.name.upper(), raising=False)
    monkeypatch.delenv("PRESET", raising=False)


def pytest_configure(config):
    """Register the project's markers."""
    config.addinivalue_line("markers", "slow: runs the full smoke job or other multi-minute checks")


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory):
    """A DATA_DIR holding the smoke tokenizer and shards, built once per test session from stdlib text."""
    import pipeline_helpers
    return pipeline_helpers.smoke_data(tmp_path_factory)[0]


def clean_env(extra, single_thread=True):
    """os.environ without the script's config vars (or their known aliases), plus `extra` (stringified).

    single_thread pins OpenMP/MKL to one thread: on a loaded 2-core box tiny models run ~10x faster so.
    """
    drop = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)} | {"PRESET"} | set(tg.KNOWN_ALIASES)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if single_thread:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(env_overrides, tmp_path, script=None, nproc=None, timeout=600, args=(), single_thread=True):
    """Run train_gpt.py (or `script`), under torchrun when nproc is set, with a clean env plus overrides."""
    import subprocess
    env = clean_env(env_overrides, single_thread)
    env.setdefault("LOG_DIR", str(tmp_path / "logs"))
    target = str(script or ROOT / "train_gpt.py")
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", target]
    else:
        cmd = [sys.executable, target]
    cmd += [str(a) for a in args]
    return subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=timeout)


def rank_results(tmp_path, tag, nproc=2):
    """The result line each rank of tests/dist_worker.py wrote to <tag>_rank<r>.txt; fails naming a missing rank."""
    lines = []
    for r in range(nproc):
        path = tmp_path / f"{tag}_rank{r}.txt"
        assert path.exists(), f"rank {r} wrote no {path.name}"
        lines.append(path.read_text().strip())
    return lines


def read_log(tmp_path, run_id):
    """Text of logs/<run_id>.txt under tmp_path's LOG_DIR."""
    return (tmp_path / "logs" / f"{run_id}.txt").read_text()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`PRESET=smoke python3 train_gpt.py` exactly as a fresh clone runs it (builds its own data):
    returns (log text, summary dict, wall seconds)."""
    import json
    import time
    run_dir = tmp_path_factory.mktemp("smoke_run")
    t0 = time.time()
    proc = run_script({"PRESET": "smoke", "RUN_ID": "smoke_test", "DATA_DIR": run_dir / "data"}, run_dir,
                      timeout=1200, single_thread=False)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (read_log(run_dir, "smoke_test"),
            json.loads((run_dir / "logs" / "smoke_test.summary.json").read_text()), wall)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention (and OpenMP spinning) on a 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
