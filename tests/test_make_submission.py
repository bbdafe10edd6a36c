"""Tests for tools/make_submission.py: statistics, compliance flags, rejection rules, t-test and the CLI."""
import copy
import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_submission", ROOT / "tools" / "make_submission.py")
ms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ms)

# Structure copied key-for-key from a real logs/<RUN_ID>.summary.json written by train_gpt.py (PRESET=smoke run
# on CPU), with the values moved to record scale (8 GPUs, sp8192, ~1.08 BPB, ~15.9 MB) so budgets are realistic.
REAL_CONFIG = {
    "adam_eps": 1e-08, "adam_wd": 0.02, "artifact_path": "final_model.int6.ptz", "attention_backend": "auto",
    "beta1": 0.9, "beta2": 0.95, "compile": "auto", "compressor": "brotli", "data_dir": "./data/", "data_seed": 0,
    "device": "auto", "dry_run": False, "ema_decay": 0.9965, "embed_bits": 8, "embed_clip_sigmas": 20.0,
    "embed_lr": 0.05, "embed_wd": 0.085, "enable_looping_at": 0.35, "eval_batch_seqs": 32,
    "eval_budget_seconds": 600.0, "eval_only": "", "eval_seq_len": 2048, "eval_stride": 64,
    "expected_val_tokens": 40540160, "gptq_block_size": 128, "gptq_calibration_batches": 64, "gptq_damp": 0.01,
    "gptq_reserve_seconds": 12.0, "grad_accum_base": 8, "grad_clip_norm": 0.3, "iterations": 20000,
    "ln_scale": True, "log_dir": "logs", "logit_softcap": 30.0, "loop_end": 5, "loop_start": 3, "matrix_bits": 6,
    "matrix_clip_sigmas": 12.85, "matrix_lr": 0.022, "max_wallclock_seconds": 600.0, "min_lr": 0.0,
    "mlp_mult": 4.0, "model_dim": 512, "muon_backend_steps": 5, "muon_momentum": 0.99,
    "muon_momentum_warmup_start": 0.92, "muon_momentum_warmup_steps": 1500, "muon_row_normalize": True,
    "muon_wd": 0.095, "num_heads": 8, "num_kv_heads": 4, "num_layers": 11, "num_loops": 2,
    "parallel_residual_start": 7, "preset": "record", "qk_gain_init": 5.25, "quant_min_numel": 65536,
    "quantized_plain_eval": True, "rope_base": 10000.0, "rope_dims": 16, "run_id": "", "scalar_lr": 0.02,
    "seed": 1337, "size_limit_bytes": 16000000, "skip_gates_enabled": True, "sliding_window_enabled": True,
    "swa_every": 50, "swa_start_frac": 0.6, "tied_embed_init_std": 0.005, "tokenizer_path": "",
    "train_batch_tokens": 786432, "train_files": "", "train_log_every": 500, "train_seq_len": 2048,
    "ttt_chunk_tokens": 32768, "ttt_enabled": True, "ttt_epochs": 3, "ttt_grad_clip": 1.0, "ttt_lr": 0.005,
    "ttt_momentum": 0.9, "val_files": "", "val_loss_every": 0, "vocab_size": 8192, "warmdown_frac": 0.72,
    "warmup_steps": 20, "weight_averaging": "ema", "xsa_last_n": 11,
}

REAL_SUMMARY = {
    "artifact_path": "final_model.int6.ptz", "bytes_code": 27830, "bytes_model": 15931170, "bytes_total": 15959000,
    "code_bytes_counted": "packed self-extracting copy of train_gpt.py (python3 train_gpt.py pack; "
                          "readable source is 104426 bytes)",
    "compliance": {"score_before_update": True, "score_first_ttt": True, "scored_exactly_once": True},
    "config": REAL_CONFIG, "data_seed": 0, "device": "cuda:0", "eval_graphs_compiled": 6,
    "eval_recompiles_after_warmup": 0,
    "eval_seconds": {"compile_warmup": 41.2, "load_artifact": 0.942, "quantized": 9.886,
                     "quantized_sliding_window": 97.923, "quantized_ttt": 357.406,
                     "total_from_artifact_load": 507.357},
    "last_in_loop_val_bpb": 1.0921, "hessian_seconds": 10.508,
    "legality": {"positions": 40540160, "score_before_update": True, "scored_exactly_once": True,
                 "scored_tokens": 40540160, "updates": 3711},
    "legality_sliding": {"positions": 40540160, "score_before_update": True, "scored_exactly_once": True,
                         "scored_tokens": 40540160, "updates": 0},
    "loop_enabled_step": 1603, "model_params": 35944536, "post_training_seconds": 590.1,
    "predicted_bytes_total": 15961070, "preset": "record", "python_version": "3.11.7",
    "pytorch_version": "2.9.1+cu128", "recompiles_in_loop": 0,
    "results": {
        "pre_quantization_post_ema": {"val_bpb": 1.0875, "val_loss": 2.80913},
        "quantized": {"val_bpb": 1.0992, "val_loss": 2.83935},
        "quantized_sliding_window": {"val_bpb": 1.0827, "val_loss": 2.79673},
        "quantized_ttt": {"budget_stopped": False, "chunks": 1238, "sgd_steps": 3711, "trained_chunks": 1237,
                          "val_bpb": 1.0810, "val_loss": 2.79234},
    },
    "run_id": "s1", "seed": 1337, "step0_val_bpb": 4.7663, "steps": 4550,
    "train_losses": [[1, 9.01], [500, 3.41], [4500, 2.83]],
    "train_plus_calibration_seconds": 598.108, "train_time_ms": 587600.1, "world_size": 8,
}


def make_summary(seed, bpb=None, loss=None, path=None, **top):
    """A realistic summary for `seed` (TTT stage val_bpb/val_loss overridable, top-level keys via **top)."""
    s = copy.deepcopy(REAL_SUMMARY)
    s["seed"] = s["config"]["seed"] = seed
    s["run_id"] = s["config"]["run_id"] = f"run_{seed}"
    s["config"]["log_dir"] = f"logs/{seed}"
    s["config"]["artifact_path"] = s["artifact_path"] = f"final_model_{seed}.int6.ptz"
    if bpb is not None:
        s["results"]["quantized_ttt"]["val_bpb"] = bpb
    if loss is not None:
        s["results"]["quantized_ttt"]["val_loss"] = loss
    s.update(top)
    s["_path"] = path or f"logs/run_{seed}.summary.json"
    return s


def three(**kw):
    """Three seeds with distinct TTT results (hand-checkable mean 1.0805, sample std 0.0005)."""
    return [make_summary(42, 1.0800, 2.7900, **kw), make_summary(1337, 1.0805, 2.7913, **kw),
            make_summary(2024, 1.0810, 2.7926, **kw)]


def build(summaries, **kw):
    """build_submission with fixed metadata."""
    args = dict(author="Ada", github_id="ada", name="Test record", blurb="blurb", date="2026-01-02")
    args.update(kw)
    return ms.build_submission(summaries, **args)


def numeric_leaves(obj):
    """All int/float leaves (bools excluded) of a JSON-like structure."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in numeric_leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in numeric_leaves(v)]
    return []


# ---------------------------------------------------------------------------------------------------------
# statistics and provenance
# ---------------------------------------------------------------------------------------------------------


def test_mean_and_std_match_hand_computation():
    sub = build(three())
    assert sub["val_bpb"] == pytest.approx(1.0805, abs=1e-12)
    assert sub["val_loss"] == pytest.approx(2.7913, abs=1e-12)
    # sample std: deviations -0.0005, 0, +0.0005 -> sqrt(2 * 0.0005^2 / 2) = 0.0005
    assert sub["val_bpb_std"] == pytest.approx(0.0005, rel=1e-9)
    assert sub["val_bpb_std"] != pytest.approx(0.0005 * math.sqrt(2 / 3), rel=1e-6)  # not the population std
    assert sub["seeds"] == [42, 1337, 2024]
    assert sub["track"] == "10min_16mb" and sub["metric"] == "quantized_ttt"


def test_output_contains_only_values_from_inputs():
    inputs = three()
    inputs[1]["bytes_total"] = 15_990_001
    sub = json.loads(json.dumps(build(inputs)))  # through JSON exactly as written
    bpbs = [s["results"]["quantized_ttt"]["val_bpb"] for s in inputs]
    losses = [s["results"]["quantized_ttt"]["val_loss"] for s in inputs]
    assert sub["val_bpb"] == math.fsum(bpbs) / 3 == statistics.fmean(bpbs)
    assert sub["val_loss"] == math.fsum(losses) / 3
    assert sub["val_bpb_std"] == statistics.stdev(bpbs)
    assert sub["bytes_total"] == 15_990_001  # max over seeds
    assert sub["bytes_code"] == REAL_SUMMARY["bytes_code"]
    assert sub["pytorch_version"] == REAL_SUMMARY["pytorch_version"]
    for s in inputs:
        row = sub["seed_results"][str(s["seed"])]
        assert row["val_bpb"] == s["results"]["quantized_ttt"]["val_bpb"]
        assert row["val_loss"] == s["results"]["quantized_ttt"]["val_loss"]
        assert row["artifact_bytes"] == s["bytes_total"]
        assert row["steps"] == s["steps"] and row["train_time_ms"] == s["train_time_ms"]
        assert row["eval_seconds"] == s["eval_seconds"]["total_from_artifact_load"]
    # every other number in the output is copied verbatim from some input summary
    allowed = set(numeric_leaves([{k: v for k, v in s.items() if k != "_path"} for s in inputs]))
    derived = {"val_bpb", "val_loss", "val_bpb_std", "val_loss_std"}
    copied = numeric_leaves({k: v for k, v in sub.items() if k not in derived})
    assert copied and all(x in allowed for x in copied), [x for x in copied if x not in allowed]


def test_default_metric_falls_back_to_last_available_stage():
    runs = three()
    for s in runs:
        del s["results"]["quantized_ttt"]
    sub = build(runs)
    assert sub["metric"] == "quantized_sliding_window"
    assert sub["val_bpb"] == REAL_SUMMARY["results"]["quantized_sliding_window"]["val_bpb"]
    for s in runs:
        del s["results"]["quantized_sliding_window"]
    assert build(runs)["metric"] == "quantized"


def test_explicit_metric_is_used():
    sub = build(three(), metric="quantized")
    assert sub["metric"] == "quantized"
    assert sub["val_bpb"] == pytest.approx(REAL_SUMMARY["results"]["quantized"]["val_bpb"], abs=1e-15)


# ---------------------------------------------------------------------------------------------------------
# compliance booleans
# ---------------------------------------------------------------------------------------------------------


def test_compliance_all_true_for_clean_runs():
    assert all(build(three())["compliance"].values())


@pytest.mark.parametrize("mutate, failing", [
    (lambda s: s.update(train_time_ms=590_000.0, hessian_seconds=10.001), {"train_under_600s"}),
    (lambda s: s.update(bytes_total=16_000_001), {"artifact_under_16mb"}),
    (lambda s: s["eval_seconds"].update(total_from_artifact_load=600.5), {"eval_under_600s"}),
    (lambda s: s["legality"].update(scored_exactly_once=False), {"scored_exactly_once"}),
    (lambda s: s["legality"].update(score_before_update=False), {"score_before_update", "score_first_ttt"}),
    (lambda s: s["compliance"].update(score_first_ttt=False), {"score_first_ttt"}),
    (lambda s: s.pop("legality"), {"scored_exactly_once", "score_before_update", "score_first_ttt"}),
])
def test_compliance_flag_flips_when_one_seed_fails(mutate, failing):
    runs = three()
    mutate(runs[2])
    comp = build(runs)["compliance"]
    assert {k for k, v in comp.items() if v is not True} == failing


def test_compliance_budget_boundaries_are_inclusive():
    runs = three()
    runs[0].update(train_time_ms=590_000.0, hessian_seconds=10.0, bytes_total=16_000_000)
    runs[0]["eval_seconds"]["total_from_artifact_load"] = 600.0
    comp = build(runs)["compliance"]
    assert comp["train_under_600s"] and comp["artifact_under_16mb"] and comp["eval_under_600s"]


def test_three_seeds_flag():
    assert build(three()[:2])["compliance"]["three_seeds"] is False
    assert build(three())["compliance"]["three_seeds"] is True


# ---------------------------------------------------------------------------------------------------------
# rejection rules
# ---------------------------------------------------------------------------------------------------------


def test_mixed_config_rejected_with_file_name():
    runs = three()
    runs[1]["config"]["matrix_lr"] = 0.03
    with pytest.raises(ms.SubmissionError, match=r"logs/run_1337\.summary\.json.*matrix_lr"):
        build(runs)


def test_per_run_paths_and_ids_may_differ():
    runs = three()
    runs[1]["config"].update(data_dir="/other/data", tokenizer_path="/x/tok.model", train_files="a*", val_files="b*")
    assert build(runs)["seeds"] == [42, 1337, 2024]


def test_different_data_seed_or_code_rejected():
    runs = three()
    runs[2]["data_seed"] = 7
    with pytest.raises(ms.SubmissionError, match=r"run_2024.*data_seed"):
        build(runs)
    runs = three()
    runs[2]["bytes_code"] += 1
    with pytest.raises(ms.SubmissionError, match=r"run_2024.*bytes_code"):
        build(runs)


def test_duplicate_seed_rejected():
    runs = three() + [make_summary(1337, 1.0801, path="logs/again.summary.json")]
    with pytest.raises(ms.SubmissionError, match=r"logs/again\.summary\.json.*seed 1337 repeats"):
        build(runs)


def test_missing_stage_rejected():
    runs = three()
    del runs[1]["results"]["quantized_ttt"]
    with pytest.raises(ms.SubmissionError, match=r"run_1337\.summary\.json.*quantized_ttt"):
        build(runs)
    # the stage every summary has is still usable when asked for explicitly
    assert build(runs, metric="quantized_sliding_window")["metric"] == "quantized_sliding_window"


def test_incomplete_summary_rejected():
    runs = three()
    del runs[0]["bytes_total"]
    with pytest.raises(ms.SubmissionError, match=r"run_42\.summary\.json.*bytes_total"):
        build(runs)


def test_nonrecord_preset_needs_flag():
    runs = three(preset="smoke")
    with pytest.raises(ms.SubmissionError, match=r"run_42.*preset is 'smoke'"):
        build(runs)
    assert build(runs, allow_nonrecord=True)["track"] == "non_record_16mb"


# ---------------------------------------------------------------------------------------------------------
# Welch t-test
# ---------------------------------------------------------------------------------------------------------


def test_builtin_student_t_known_value():
    assert ms.student_t_sf_builtin(2.0, 4) == pytest.approx(0.05805826175840778, rel=1e-10)
    assert ms.student_t_sf_builtin(0.0, 7.3) == pytest.approx(0.5, abs=1e-15)
    assert ms.student_t_sf_builtin(-2.0, 4) == pytest.approx(1 - 0.05805826175840778, rel=1e-10)
    # dof=1 is Cauchy: sf(t) = 1/2 - atan(t)/pi
    assert ms.student_t_sf_builtin(3.0, 1) == pytest.approx(0.5 - math.atan(3.0) / math.pi, rel=1e-10)


def test_builtin_student_t_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 2.88, 4, 7.5, 30, 300):
        for t in (-6.0, -1.3, -0.2, 0.4, 1.0, 2.5, 9.0):
            assert ms.student_t_sf_builtin(t, dof) == pytest.approx(stats.t.sf(t, dof), rel=1e-9, abs=1e-14)


def test_welch_matches_hand_formula_and_scipy():
    sub = build(three(), baseline=(1.0830, 0.0004, 3))
    sig = sub["significance"]
    m, s, n, bm, bs, bn = sub["val_bpb"], sub["val_bpb_std"], 3, 1.0830, 0.0004, 3
    v1, v2 = s * s / n, bs * bs / bn
    assert sig["t"] == pytest.approx((m - bm) / math.sqrt(v1 + v2), rel=1e-12)
    assert sig["dof"] == pytest.approx((v1 + v2) ** 2 / (v1 ** 2 / (n - 1) + v2 ** 2 / (bn - 1)), rel=1e-12)
    assert sig["t"] < 0 and 0 < sig["p_value"] < 0.01
    assert sig["delta_bpb"] == pytest.approx(0.0025, abs=1e-12)
    assert sig["meets_threshold"] is True and sig["significant_at_0_01"] is True
    assert sig["delta_nats_sp8192_estimate"] == pytest.approx(0.0025 / 0.38713, rel=1e-12)
    ratio = statistics.fmean(s["results"]["quantized_ttt"]["val_loss"] / s["results"]["quantized_ttt"]["val_bpb"]
                             for s in three())
    assert sig["delta_nats"] == pytest.approx(0.0025 * ratio, rel=1e-9)
    try:
        from scipy import stats
    except ImportError:
        assert sig["p_method"] == "builtin_incomplete_beta"
        assert sig["p_value"] == pytest.approx(ms.student_t_sf_builtin(-sig["t"], sig["dof"]), rel=1e-12)
        return
    ref = stats.ttest_ind_from_stats(m, s, n, bm, bs, bn, equal_var=False, alternative="less")
    assert sig["p_method"] == "scipy.stats.t.sf"
    assert sig["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert sig["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_small_improvement_misses_threshold():
    sig = build(three(), baseline=(1.0820, 0.0001, 3))["significance"]
    assert sig["delta_bpb"] == pytest.approx(0.0015, abs=1e-12)
    assert sig["meets_threshold"] is False


def test_worse_than_baseline_has_large_p():
    sig = build(three(), baseline=(1.0780, 0.0004, 3))["significance"]
    assert sig["t"] > 0 and sig["p_value"] > 0.5 and sig["delta_bpb"] < 0


def test_welch_needs_two_seeds():
    with pytest.raises(ms.SubmissionError, match="2"):
        build([make_summary(1)], baseline=(1.0830, 0.0004, 3))


# ---------------------------------------------------------------------------------------------------------
# markdown table and CLI
# ---------------------------------------------------------------------------------------------------------


def test_markdown_table_rows():
    runs = three()
    del runs[0]["results"]["quantized_sliding_window"]
    sub = build(runs)
    lines = ms.markdown_table(runs, sub).splitlines()
    seed_rows = [ln for ln in lines if ln.startswith("| ") and ln.split("|")[1].strip().isdigit()]
    assert len(seed_rows) == 3
    cells = [c.strip() for c in seed_rows[0].split("|")[1:-1]]
    assert cells == ["42", "4550", "1.08750000", "1.09920000", "—", "1.08000000", "15,959,000"]


def test_hardware_warning():
    runs = three()
    assert ms.hardware_warnings(runs, "8xH100 80GB SXM") == []
    runs[0]["world_size"] = 1
    runs[0]["device"] = "cpu"
    assert len(ms.hardware_warnings(runs, "8xH100 80GB SXM")) == 2


def _write(tmp_path, summaries):
    """Write summaries (without the _path key) as JSON files; returns their paths as strings."""
    paths = []
    for s in summaries:
        p = tmp_path / f"run_{s['seed']}.summary.json"
        p.write_text(json.dumps({k: v for k, v in s.items() if k != "_path"}))
        paths.append(str(p))
    return paths


def test_cli_writes_submission(tmp_path, capsys):
    paths = _write(tmp_path, three())
    out = tmp_path / "rec" / "submission.json"
    rc = ms.main(paths + ["--author", "Ada", "--github-id", "ada", "--name", "N", "--blurb", "B",
                          "--baseline-bpb", "1.0830", "--baseline-std", "0.0004", "--baseline-n", "3",
                          "--out", str(out)])
    assert rc == 0
    sub = json.loads(out.read_text())
    assert sub["val_bpb"] == statistics.fmean([1.0800, 1.0805, 1.0810])
    assert sub["date"] == ms.datetime.date.today().isoformat()
    # no GPU model in these summaries (and no logs beside them): said plainly, never assumed to be H100
    assert sub["hardware"] == "8x CUDA GPU (model not recorded in the summaries or logs)"
    assert sub["author"] == "Ada" and sub["github_id"] == "ada"
    assert "significance" in sub
    printed = capsys.readouterr().out
    assert "| 1337 | 4550 |" in printed and "all checks pass" in printed


def test_cli_error_names_file(tmp_path, capsys):
    runs = three()
    runs[2]["config"]["num_layers"] = 12
    paths = _write(tmp_path, runs)
    out = tmp_path / "submission.json"
    rc = ms.main(paths + ["--author", "A", "--github-id", "a", "--name", "N", "--blurb", "B", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "run_2024.summary.json" in capsys.readouterr().err


def test_cli_baseline_args_go_together(tmp_path):
    paths = _write(tmp_path, three())
    with pytest.raises(SystemExit):
        ms.main(paths + ["--author", "A", "--github-id", "a", "--name", "N", "--blurb", "B", "--baseline-bpb", "1.08"])


def test_cli_on_bad_json(tmp_path, capsys):
    bad = tmp_path / "bad.summary.json"
    bad.write_text("{not json")
    rc = ms.main([str(bad), "--author", "A", "--github-id", "a", "--name", "N", "--blurb", "B",
                  "--out", str(tmp_path / "s.json")])
    assert rc == 2 and "bad.summary.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# hardware from the runs, non-record CPU submissions, deterministic output
# ---------------------------------------------------------------------------------------------------------

NVIDIA_SMI_TABLE = """
+-----------------------------------------------------------------------------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|=========================================+========================+======================|
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |                    0 |
|   1  NVIDIA H100 80GB HBM3          On  |   00000000:2A:00.0 Off |                    0 |
+-----------------------------------------+------------------------+----------------------+
"""


def cpu_runs(tmp_path, cpus=2, finished=("2026-02-03T10:00:00+00:00", "2026-02-04T09:30:00+00:00")):
    """Two smoke-preset CPU summaries written to tmp_path, each with a runner meta file; returns their paths."""
    runs = [make_summary(1, 1.3001, 3.36), make_summary(2, 1.3011, 3.37)]
    for s, stamp in zip(runs, finished):
        s.update(preset="smoke", device="cpu", world_size=1)
        s["config"]["preset"] = "smoke"
        meta = {"run_id": s["run_id"], "cpus_available": cpus, "cpu_count": cpus, "finished_utc": stamp}
        (tmp_path / f"{s['run_id']}.meta.json").write_text(json.dumps(meta))
    return _write(tmp_path, runs)


def test_cpu_nonrecord_submission_says_what_ran(tmp_path):
    paths = cpu_runs(tmp_path)
    sub = build([ms.load_summary(p) for p in paths], allow_nonrecord=True, date=None, deterministic=True)
    assert sub["hardware"] == "CPU (2 cores), 1 process"
    assert sub["track"] == "non_record_16mb" and sub["preset"] == "smoke" and sub["device"] == "cpu"
    assert sub["non_record_reasons"] == ["preset smoke is not 'record'", "device cpu, not CUDA",
                                         "world size 1, not 8"]
    assert sub["date"] == "2026-02-04"  # the newest run's finished_utc, not today
    assert sub["compliance"]["three_seeds"] is False


def test_cpu_core_count_never_invented(tmp_path):
    paths = cpu_runs(tmp_path)
    for p in tmp_path.glob("*.meta.json"):
        p.unlink()
    sub = build([ms.load_summary(p) for p in paths], allow_nonrecord=True)
    assert sub["hardware"] == "CPU (core count not recorded), 1 process"


def test_record_preset_off_8_gpus_is_not_a_record():
    runs = three(world_size=1)
    with pytest.raises(ms.SubmissionError, match=r"run_42.*not a record run.*world size 1, not 8"):
        build(runs)
    sub = build(runs, allow_nonrecord=True)
    assert sub["track"] == "non_record_16mb" and sub["non_record_reasons"] == ["world size 1, not 8"]
    assert "non_record_reasons" not in build(three())


def test_gpu_model_read_from_the_log(tmp_path):
    paths = _write(tmp_path, three())
    for s in three():
        (tmp_path / f"{s['run_id']}.txt").write_text("Hyperparameters:\n" + NVIDIA_SMI_TABLE)
    sub = build([ms.load_summary(p) for p in paths])
    assert sub["hardware"] == "8xNVIDIA H100 80GB HBM3"


def test_deterministic_output_is_byte_identical(tmp_path):
    paths = cpu_runs(tmp_path)
    args = ["--author", "A", "--github-id", "a", "--name", "N", "--blurb", "B", "--allow-nonrecord",
            "--deterministic"]
    first, second = tmp_path / "one" / "submission.json", tmp_path / "two" / "submission.json"
    assert ms.main(paths + args + ["--out", str(first)]) == 0
    assert ms.main(list(reversed(paths)) + args + ["--out", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()
    assert json.loads(first.read_text())["date"] == "2026-02-04"


def test_deterministic_without_a_recorded_date_is_refused(tmp_path, capsys):
    paths = cpu_runs(tmp_path)
    for p in tmp_path.glob("*.meta.json"):
        p.unlink()
    out = tmp_path / "submission.json"
    rc = ms.main(paths + ["--author", "A", "--github-id", "a", "--name", "N", "--blurb", "B", "--allow-nonrecord",
                          "--deterministic", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "--deterministic needs a run date" in capsys.readouterr().err


def test_explicit_hardware_is_checked_against_the_runs(tmp_path, capsys):
    paths = cpu_runs(tmp_path)
    out = tmp_path / "submission.json"
    rc = ms.main(paths + ["--author", "A", "--github-id", "a", "--name", "N", "--blurb", "B", "--allow-nonrecord",
                          "--hardware", "8xH100 80GB SXM", "--out", str(out)])
    assert rc == 0 and json.loads(out.read_text())["hardware"] == "8xH100 80GB SXM"
    assert capsys.readouterr().err.count("warning:") == 2  # world size and device contradict the claim


def test_committed_submission_json_regenerates_identically(tmp_path, monkeypatch):
    """The repository's submission.json is exactly what its committed logs/minigolf runs produce."""
    args_file = ROOT / "logs" / "minigolf" / "submission.args"
    committed = ROOT / "submission.json"
    assert args_file.exists() and committed.exists(), "logs/minigolf/submission.args and submission.json are committed"
    monkeypatch.chdir(ROOT)  # the args file names the summaries relative to the repository root
    out = tmp_path / "submission.json"
    assert ms.main(["@" + str(args_file), "--out", str(out)]) == 0
    assert out.read_bytes() == committed.read_bytes()
    sub = json.loads(committed.read_text())
    summaries = [json.loads((ROOT / line).read_text()) for line in args_file.read_text().splitlines()
                 if line.endswith(".summary.json")]
    assert len(summaries) == 3 and sub["track"] == "non_record_16mb"
    assert sub["val_bpb"] == statistics.fmean(s["results"]["quantized_ttt"]["val_bpb"] for s in summaries)
    assert sub["hardware"].startswith("CPU (2 cores)")
