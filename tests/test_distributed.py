"""Multi-process equivalence on CPU/gloo: a 2-rank torchrun run must match the 1-rank run."""
import json
import re
import time

import pytest

from conftest import ROOT, rank_results, read_log, run_script

TINY_RUN = dict(
    PRESET="smoke", ITERATIONS=20, MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=1, TRAIN_LOG_EVERY=1,
    VAL_LOSS_EVERY=0, NUM_LAYERS=4, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=8, LOOP_START=1,
    LOOP_END=1, PARALLEL_RESIDUAL_START=2, XSA_LAST_N=2, ENABLE_LOOPING_AT=0.5, GPTQ_CALIBRATION_BATCHES=2,
    EVAL_STRIDE=128, TTT_CHUNK_TOKENS=2048, TTT_EPOCHS=1, QUANTIZED_PLAIN_EVAL=1,
    GRAD_ACCUM_BASE=4,  # 1 rank: 4 micro-steps; 2 ranks: 2 each, the first under DDP no_sync
    # PRESET=frontier's model and optimiser switches, so 2 ranks == 1 rank holds with them on
    SMEAR_GATE=1, SPARSE_ATTN_GATE=1, PARALLEL_LANES=1, MUON_NS_COEFFS="polar_express", FUSED_CE="chunked",
)


DIST_VAL_TOKENS = 8192  # scored positions of the validation prefix these runs use: 4 TTT chunks, 32 windows


@pytest.fixture(scope="module")
def dist_data(smoke_data_dir, tmp_path_factory):
    """Env for the smoke data with validation cut to its first DIST_VAL_TOKENS + 1 tokens (eval time)."""
    import pipeline_helpers as ph
    from conftest import tg
    _, val_glob, _ = tg.data_paths(tg.load_config({"PRESET": "smoke", "DATA_DIR": str(smoke_data_dir)}))
    path = ph.val_prefix(tmp_path_factory.mktemp("dist_val"), val_glob, DIST_VAL_TOKENS, "val")
    return dict(DATA_DIR=smoke_data_dir, VAL_FILES=path)


def summary(tmp_path, run_id):
    """The run's summary JSON."""
    return json.loads((tmp_path / "logs" / f"{run_id}.summary.json").read_text())


@pytest.fixture(scope="module")
def paired_runs(dist_data, tmp_path_factory):
    """The tiny job as one process, then as torchrun --nproc_per_node=2 (gloo) training and, separately,
    2-rank evaluation of the 1-rank artifact (EVAL_ONLY), so eval is compared on identical weights."""
    out = {}
    tmp1 = tmp_path_factory.mktemp("dist1")
    artifact = tmp1 / "model.ptz"
    runs = [
        ("w1", 1, tmp1, dict(ARTIFACT_PATH=artifact)),
        ("w2", 2, tmp_path_factory.mktemp("dist2"),
         dict(QUANTIZED_PLAIN_EVAL=0, SLIDING_WINDOW_ENABLED=0, TTT_ENABLED=0)),
        ("e2", 2, tmp_path_factory.mktemp("eval2"), dict(EVAL_ONLY=artifact)),
    ]
    for run_id, nproc, tmp, extra in runs:
        env = dict(TINY_RUN, **dist_data, RUN_ID=run_id, **extra)
        env.setdefault("ARTIFACT_PATH", tmp / "model.ptz")
        proc = run_script(env, tmp, nproc=nproc if nproc > 1 else None)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[run_id] = (summary(tmp, run_id), read_log(tmp, run_id))
    return out


def test_two_ranks_train_like_one(paired_runs):
    """Per-step global train loss of 2 ranks x 2 micro-steps (DDP) equals 1 rank x 4 micro-steps (1e-4 rel)."""
    one, two = paired_runs["w1"][0]["train_losses"], paired_runs["w2"][0]["train_losses"]
    assert len(one) == len(two) == 20
    for (s1, l1), (s2, l2) in zip(one, two):
        assert s1 == s2
        assert abs(l1 - l2) <= 1e-4 * abs(l1), (s1, l1, l2)
    assert one[-1][1] < one[0][1] - 0.5  # it learned, so equality is not of two constant curves
    a = paired_runs["w1"][0]["results"]["pre_quantization_post_ema"]["val_bpb"]
    b = paired_runs["w2"][0]["results"]["pre_quantization_post_ema"]["val_bpb"]
    assert abs(a - b) <= 1e-4 * a


def test_two_ranks_evaluate_like_one(paired_runs):
    """On the same artifact, plain, sliding and TTT val_bpb of 2 ranks match 1 rank within 1e-6 relative."""
    r1, r2 = paired_runs["w1"][0]["results"], paired_runs["e2"][0]["results"]
    for stage in ("quantized", "quantized_sliding_window", "quantized_ttt"):
        a, b = r1[stage]["val_bpb"], r2[stage]["val_bpb"]
        assert abs(a - b) <= 1e-6 * abs(a), (stage, a, b)
    assert r1["quantized_ttt"]["sgd_steps"] == r2["quantized_ttt"]["sgd_steps"] > 0
    assert r1["quantized_ttt"]["val_bpb"] != r1["quantized_sliding_window"]["val_bpb"]  # TTT really adapted
    for run_id in ("w1", "e2"):
        s, log = paired_runs[run_id]
        assert s["legality"]["scored_exactly_once"] and s["legality"]["score_before_update"]
        assert re.search(r"^legality: positions=\d+ scored_exactly_once=True score_before_update=True$", log, re.M)


def test_muon_sharding_keeps_ranks_identical(dist_data, tmp_path):
    """After every step all ranks hold bit-identical weights; each owns momentum for its round-robin share."""
    env = dict(TINY_RUN, **dist_data)
    proc = run_script(env, tmp_path, script=ROOT / "tests" / "dist_worker.py", nproc=2, args=["muon"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = rank_results(tmp_path, "MUON_OK")
    assert [ln.split()[1] for ln in lines] == ["rank=0", "rank=1"]
    assert len({ln.split("checksum=")[1] for ln in lines}) == 1


def test_rank_failure_stops_launcher_quickly(tmp_path):
    """A rank that raises makes torchrun exit non-zero within seconds, with the error shown (no hang)."""
    t0 = time.time()
    proc = run_script({"PRESET": "smoke"}, tmp_path, script=ROOT / "tests" / "dist_worker.py", nproc=2,
                      args=["fail"], timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert elapsed < 60, elapsed


def test_other_ranks_outwait_a_slow_export(dist_data, tmp_path):
    """Rank 0 quantises, compresses and may refit alone for minutes while the others wait. With
    DIST_TIMEOUT_SECONDS=8 and rank 0's export delayed by 20 s, both ranks still finish the run and exit 0:
    they wait on the EXPORT_WAIT_SECONDS gloo group, not on a collective that times out."""
    env = dict(TINY_RUN, **dist_data, ITERATIONS=2, TTT_ENABLED=0, SLIDING_WINDOW_ENABLED=0, DIST_TIMEOUT_SECONDS=8,
               RUN_ID="slow", ARTIFACT_PATH=tmp_path / "m.ptz")
    t0 = time.time()
    proc = run_script(env, tmp_path, script=ROOT / "tests" / "dist_worker.py", nproc=2, args=["slow_export"],
                      timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert time.time() - t0 > 20
    assert [ln.split()[1:] for ln in rank_results(tmp_path, "SLOW_EXPORT")] == [["rank=0", "code=0"],
                                                                              ["rank=1", "code=0"]]
    log = read_log(tmp_path, "slow")
    assert re.search(r"dist_timeout:8s export_wait:1800s", log) and re.search(r"^quantized val_loss:", log, re.M)
    # rank 1 built its eval model 3 s late: every stage ends on all ranks, so load_artifact holds those 3 s
    stages = json.loads((tmp_path / "logs" / "slow.summary.json").read_text())["eval_seconds"]
    assert stages["load_artifact"] >= 3.0 and stages["quantized"] < 3.0, stages


def test_ranks_follow_one_clock_under_a_wallclock_cap(dist_data, tmp_path):
    """With a wallclock cap the LR schedule and the looping switch follow training time. Rank 1's clock reads
    20 s ahead of rank 0's: both ranks still train bit-identical weights (every rank uses rank 0's clock,
    carried in the per-step reduction), and looping switches on at the step-based point rank 0 sees."""
    env = dict(TINY_RUN, **dist_data, ITERATIONS=8, MAX_WALLCLOCK_SECONDS=60, GPTQ_RESERVE_SECONDS=0,
               WARMDOWN_FRAC=1.0)
    proc = run_script(env, tmp_path, script=ROOT / "tests" / "dist_worker.py", nproc=2, args=["skewed_clock"],
                      timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [ln.split()[1:] for ln in rank_results(tmp_path, "SKEW")]
    assert lines == [["rank=0", "identical=True", "steps=8", "loop_step=4"],
                     ["rank=1", "identical=True", "steps=8", "loop_step=4"]]


def test_the_schedule_follows_the_training_clock_under_a_cap(dist_data, tmp_path):
    """One rank whose clock reads 30 s ahead on a 60 s cap: the training fraction is time-based, so looping
    (ENABLE_LOOPING_AT=0.5) switches on at step 2, the first step with a settled clock reading, where the
    step count alone (8 iterations) would give step 4."""
    env = dict(TINY_RUN, **dist_data, ITERATIONS=8, MAX_WALLCLOCK_SECONDS=60, GPTQ_RESERVE_SECONDS=0,
               WARMDOWN_FRAC=1.0, CLOCK_SKEW_RANK=0, CLOCK_SKEW_MS=30000)
    proc = run_script(env, tmp_path, script=ROOT / "tests" / "dist_worker.py", args=["skewed_clock"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert rank_results(tmp_path, "SKEW", nproc=1)[0].split()[1:] == ["rank=0", "identical=True", "steps=8",
                                                                      "loop_step=2"]


def test_ranks_agree_on_building_the_smoke_data(dist_data, tmp_path):
    """Rank 0 sees the smoke data missing and builds it (nothing to write: it exists), rank 1 looks later and
    sees it: the decision to build and wait is taken once for all ranks, so no rank skips the barrier (which
    left the ranks' collectives mismatched until the timeout)."""
    env = dict(TINY_RUN, **dist_data, DIST_TIMEOUT_SECONDS=15)
    proc = run_script(env, tmp_path, script=ROOT / "tests" / "dist_worker.py", nproc=2, args=["late_data"],
                      timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [ln.split()[1:] for ln in rank_results(tmp_path, "LATE_DATA")] == [["rank=0", "sum=2"],
                                                                            ["rank=1", "sum=2"]]


def test_successful_two_rank_runs_always_exit_zero(dist_data, tmp_path):
    """A finished 2-rank run exits 0 on every rank, every time (it once aborted in teardown with 'terminate
    called without an active exception'): three back-to-back runs, each must finish, write its summary and
    leave no abort message."""
    env = dict(TINY_RUN, **dist_data, ITERATIONS=4, TTT_ENABLED=0, SLIDING_WINDOW_ENABLED=0)
    for i in range(3):
        run_dir = tmp_path / f"r{i}"
        run_dir.mkdir()
        proc = run_script(dict(env, RUN_ID=f"exit{i}", ARTIFACT_PATH=run_dir / "m.ptz"), run_dir, nproc=2)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert "terminate called" not in out and "SIGABRT" not in out and "FAILED" not in out
        assert summary(run_dir, f"exit{i}")["results"]["quantized"]["val_bpb"] > 0


@pytest.mark.slow
def test_compiled_ddp_two_ranks_train_like_eager_one_rank(paired_runs, dist_data, tmp_path):
    """The record's launch mode: torch.compile + DDP (bucketed, no_sync accumulation) on 2 ranks gives the
    1-rank eager run's per-step losses (1e-4 relative), with no recompiles once the clock runs. (Compiling the
    DDP wrapper with fullgraph=True fails inside dynamo: a regression test for the first GPU run.)"""
    env = dict(TINY_RUN, **dist_data, RUN_ID="cddp", COMPILE=1, ARTIFACT_PATH=tmp_path / "m.ptz",
               TTT_ENABLED=0, SLIDING_WINDOW_ENABLED=0)
    proc = run_script(env, tmp_path, nproc=2, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = summary(tmp_path, "cddp")
    eager = paired_runs["w1"][0]["train_losses"]
    assert len(compiled["train_losses"]) == len(eager) == 20
    for (s1, l1), (s2, l2) in zip(eager, compiled["train_losses"]):
        assert s1 == s2 and abs(l1 - l2) <= 1e-4 * abs(l1), (s1, l1, l2)
    assert compiled["recompiles_in_loop"] == 0
