"""Config tests: env parsing, presets, typo detection, validation, and the script's CLI behaviour."""
import dataclasses
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tg, tiny_config

SCRIPT = ROOT / "train_gpt.py"


# ------------------------------------------------------------------------------------------------
# Env parsing and presets
# ------------------------------------------------------------------------------------------------


def test_env_values_are_parsed_by_field_type():
    cfg = tg.load_config(environ={"NUM_LAYERS": "7", "MATRIX_LR": "0.125", "TTT_ENABLED": "0",
                                  "COMPRESSOR": "zstd", "RUN_ID": "abc", "ROPE_BASE": "5e3", "SEED": " 42 "})
    assert (cfg.num_layers, cfg.matrix_lr, cfg.ttt_enabled, cfg.compressor, cfg.run_id) == (7, 0.125, False,
                                                                                          "zstd", "abc")
    assert cfg.rope_base == 5000.0 and cfg.seed == 42
    assert type(cfg.num_layers) is int and type(cfg.matrix_lr) is float and type(cfg.ttt_enabled) is bool
    # untouched fields keep the record defaults
    assert cfg.model_dim == 512 and cfg.preset == "record"


@pytest.mark.parametrize("raw,want", [("1", True), ("0", False), ("true", True), ("false", False),
                                      ("yes", True), ("no", False), ("on", True), ("off", False),
                                      ("TRUE", True), ("Off", False), (" yes ", True)])
def test_bool_spellings(raw, want):
    assert tg.load_config(environ={"DRY_RUN": raw}).dry_run is want
    assert tg.load_config(environ={"TTT_ENABLED": raw}).ttt_enabled is want


@pytest.mark.parametrize("key,raw", [("NUM_LAYERS", "12x"), ("NUM_LAYERS", "8.0"), ("NUM_LAYERS", ""),
                                     ("MATRIX_LR", "fast"), ("TTT_ENABLED", "maybe"), ("DRY_RUN", "2")])
def test_malformed_values_name_the_variable(key, raw):
    with pytest.raises(tg.ConfigError) as exc:
        tg.load_config(environ={key: raw})
    assert key in str(exc.value) and repr(raw) in str(exc.value)


def test_smoke_preset_values_and_env_override():
    cfg = tg.load_config(environ={"PRESET": "smoke"})
    assert cfg.preset == "smoke"
    for k, v in tg.SMOKE_PRESET.items():
        assert getattr(cfg, k) == v, k
    assert cfg.model_dim == 128 and cfg.num_layers == 6 and cfg.vocab_size == 1024
    assert cfg.matrix_bits == tg.Hyperparameters().matrix_bits  # not in the preset: record default
    cfg = tg.load_config(environ={"PRESET": "smoke", "MODEL_DIM": "256", "EMA_DECAY": "0.5"})
    assert cfg.model_dim == 256 and cfg.ema_decay == 0.5
    assert cfg.num_layers == tg.SMOKE_PRESET["num_layers"]
    record = tg.load_config(environ={})
    assert record.preset == "record" and record.model_dim == 512 and record.num_layers == 11


def test_unknown_preset():
    with pytest.raises(tg.ConfigError, match="PRESET='tiny'") as exc:
        tg.load_config(environ={"PRESET": "tiny"})
    assert "record" in str(exc.value) and "smoke" in str(exc.value)


def test_run_id_default_and_explicit():
    a, b = tg.load_config(environ={}), tg.load_config(environ={"PRESET": "smoke"})
    assert a.run_id.startswith("record_") and b.run_id.startswith("smoke_") and a.run_id != b.run_id
    assert tg.load_config(environ={"RUN_ID": "mine"}).run_id == "mine"


# ------------------------------------------------------------------------------------------------
# Typos and foreign variables
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,hint", [("TTT_EPOCH", "TTT_EPOCHS"), ("MATRIX_LRR", "MATRIX_LR"),
                                      ("DATA_PATH", "DATA_DIR"), ("TIED_EMBED_LR", "EMBED_LR"),
                                      ("NUM_LAYER", "NUM_LAYERS"), ("WARMDOWN_FRACT", "WARMDOWN_FRAC")])
def test_typos_are_rejected_with_a_hint(key, hint):
    with pytest.raises(tg.ConfigError) as exc:
        tg.load_config(environ={key: "3"})
    msg = str(exc.value)
    assert key in msg and hint in msg


def test_unrelated_env_vars_pass():
    env = {"HOME": "/root", "PATH": "/usr/bin", "OMP_NUM_THREADS": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_PORT": "29500", "MASTER_ADDR": "localhost", "RANK": "0", "PYTEST_CURRENT_TEST": "x",
           "CUDA_VISIBLE_DEVICES": "0", "NCCL_DEBUG": "INFO", "PYTHONPATH": ".", "LANG": "C.UTF-8",
           "TORCH_LOGS": "", "MODEL_DIM": "64"}
    assert tg.load_config(environ=env).model_dim == 64
    # and the real environment of this test process (autouse fixture stripped config vars)
    assert tg.load_config().preset == "record"


# ------------------------------------------------------------------------------------------------
# validate_config
# ------------------------------------------------------------------------------------------------


def test_valid_configs_pass():
    for ws in (1, 2, 4, 8):
        tg.validate_config(tg.Hyperparameters(), ws)
    tg.validate_config(tg.load_config(environ={"PRESET": "smoke"}), 1)
    tg.validate_config(tiny_config(), 1)
    tg.validate_config(tiny_config(), 2)


@pytest.mark.parametrize("overrides,world,names", [
    (dict(num_heads=4, num_kv_heads=3), 1, ["NUM_HEADS", "NUM_KV_HEADS"]),
    (dict(model_dim=30), 1, ["MODEL_DIM"]),
    (dict(loop_start=2, loop_end=5), 1, ["LOOP_END"]),
    (dict(loop_start=3, loop_end=2), 1, ["LOOP_START"]),
    (dict(loop_start=-1), 1, ["LOOP_START"]),
    (dict(grad_accum_base=8, train_batch_tokens=256), 3, ["GRAD_ACCUM_BASE", "3"]),
    (dict(train_batch_tokens=100), 1, ["TRAIN_BATCH_TOKENS"]),
    (dict(ttt_chunk_tokens=40), 1, ["TTT_CHUNK_TOKENS", "EVAL_SEQ_LEN"]),
    (dict(compressor="zip"), 1, ["COMPRESSOR"]),
    (dict(rope_dims=5), 1, ["ROPE_DIMS"]),
    (dict(rope_dims=16), 1, ["ROPE_DIMS"]),
    (dict(xsa_last_n=6), 1, ["XSA_LAST_N"]),
    (dict(eval_stride=0), 1, ["EVAL_STRIDE"]),
    (dict(weight_averaging="mean"), 1, ["WEIGHT_AVERAGING"]),
    (dict(attention_backend="flash"), 1, ["ATTENTION_BACKEND"]),
    (dict(vocab_size=70000), 1, ["VOCAB_SIZE"]),
    (dict(max_wallclock_seconds=10.0, gptq_reserve_seconds=12.0), 1, ["MAX_WALLCLOCK_SECONDS"]),
])
def test_validate_config_names_the_variable(overrides, world, names):
    tg.validate_config(tiny_config(), 1)  # the base itself is valid
    with pytest.raises(tg.ConfigError) as exc:
        tg.validate_config(tiny_config(**overrides), world)
    for n in names:
        assert n in str(exc.value)


def test_loop_range_ignored_without_loops():
    tg.validate_config(tiny_config(num_loops=0, loop_start=3, loop_end=9), 1)


def test_validate_rejects_zero_ttt_chunk():
    with pytest.raises(tg.ConfigError, match="TTT_CHUNK_TOKENS"):
        tg.validate_config(tiny_config(ttt_chunk_tokens=0), 1)


@pytest.mark.parametrize("field", ["num_kv_heads", "num_heads", "train_seq_len", "grad_accum_base"])
def test_validate_rejects_zero_divisors(field):
    with pytest.raises(tg.ConfigError, match=field.upper()):
        tg.validate_config(tiny_config(**{field: 0}), 1)


# ------------------------------------------------------------------------------------------------
# The script as a subprocess
# ------------------------------------------------------------------------------------------------


def script_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}}
    env.update(LOG_DIR=str(tmp_path / "logs"), DATA_DIR=str(tmp_path / "no_data_here"), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_script(tmp_path, **extra):
    return subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=script_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=300)


def test_cli_typo_exits_nonzero_with_one_line(tmp_path):
    proc = run_script(tmp_path, TTT_EPOCH="3")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "TTT_EPOCH" in lines[0] and "TTT_EPOCHS" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "logs").exists()


def test_cli_dry_run_needs_no_data_and_appends_to_the_log(tmp_path):
    run_id = "dry_run_test"
    first = run_script(tmp_path, DRY_RUN="1", RUN_ID=run_id)
    assert first.returncode == 0, first.stderr
    assert "model_params:35944536" in first.stdout.splitlines()
    log = tmp_path / "logs" / f"{run_id}.txt"
    text1 = log.read_text()
    assert "model_params:35944536" in text1 and "dry_run:" in text1
    # second run, same RUN_ID (a different preset so the two runs are distinguishable): appended, not replaced
    second = run_script(tmp_path, DRY_RUN="1", RUN_ID=run_id, PRESET="smoke")
    assert second.returncode == 0, second.stderr
    smoke_params = sum(p.numel() for p in tg.GPT(tg.load_config(environ={"PRESET": "smoke"})).parameters())
    assert f"model_params:{smoke_params}" in second.stdout.splitlines()
    text2 = log.read_text()
    assert text2.startswith(text1)
    lines = text2.splitlines()
    assert lines.count("model_params:35944536") == 1 and lines.count(f"model_params:{smoke_params}") == 1
    assert lines.index("model_params:35944536") < lines.index(f"model_params:{smoke_params}")
    assert lines.count("Hyperparameters:") == 2
    assert not (tmp_path / "no_data_here").exists()  # nothing was read or built
