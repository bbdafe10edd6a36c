"""Tests for tools/ablate.py: plan parsing, statistics against hand values, the tiny 2x2 ablation end to end
(resume without rerunning, refusal of mixed data / configs / stale plans, failed runs), and the curves."""
import json
import math
import re
import shutil
import statistics
import sys

import pytest

import tools_helpers as th
from conftest import ROOT

ablate = th.load_tool("ablate")


# ---------------------------------------------------------------------------------------------------------
# plan parsing
# ---------------------------------------------------------------------------------------------------------


def plan(*argv):
    """A Plan from ablate.py arguments (resolved with the repo's train_gpt.py for preset defaults)."""
    p = ablate.Plan(ablate.parse_args(["--name", "t", *argv]))
    p.resolve(ablate.batch_tokens_from_script(ROOT / "train_gpt.py"))
    return p


def test_plan_env_layers_and_run_ids():
    p = plan("--base", "PRESET=smoke,NUM_LAYERS=4", "--env", "OMP_NUM_THREADS=1",
             "--variant", "lr=MATRIX_LR=0.03,EMBED_LR=0.05", "--variant", "deep=NUM_LAYERS=6",
             "--seeds", "3,1", "--iterations", "7")
    assert [(r.variant, r.seed, r.run_id) for r in p.runs] == [
        ("base", 3, "t_base_s3"), ("base", 1, "t_base_s1"), ("lr", 3, "t_lr_s3"), ("lr", 1, "t_lr_s1"),
        ("deep", 3, "t_deep_s3"), ("deep", 1, "t_deep_s1")]
    base, lr, deep = p.runs[0].env, p.runs[2].env, p.runs[4].env
    assert base == {"PRESET": "smoke", "NUM_LAYERS": "4", "OMP_NUM_THREADS": "1", "ITERATIONS": "7",
                    "MAX_WALLCLOCK_SECONDS": "0"}
    assert lr == dict(base, MATRIX_LR="0.03", EMBED_LR="0.05")
    assert deep == dict(base, NUM_LAYERS="6")  # the variant wins over the base
    runner = p.runs[1].runner_env()
    assert runner["SEED"] == "1" and runner["RUN_ID"] == "t_base_s1"
    assert runner["LOG_DIR"] == str(p.runs_dir) and runner["ARTIFACT_PATH"].endswith("t_base_s1.int6.ptz")


@pytest.mark.parametrize("argv, message", [
    (["--variant", "base=NUM_LAYERS=3"], "reserved"),
    (["--variant", "a=NUM_LAYERS=3", "--variant", "a=NUM_LAYERS=4"], "used twice"),
    (["--variant", "a=num_layers=3"], "upper-case"),
    (["--variant", "a=NUM_LAYERS"], "KEY=VALUE"),
    (["--variant", "bad name=X=1"], "LABEL"),
    (["--base", "SEED=3"], "set by the runner"),
    (["--variant", "a=RUN_ID=x"], "set by the runner"),
    (["--base", "ITERATIONS=5", "--iterations", "3"], "set the budget once"),
    (["--base", "A=1", "--env", "A=2"], "set twice"),
    (["--seeds", "1,1"], "distinct"),
    (["--seeds", "x"], "integers"),
])
def test_plan_errors(argv, message):
    with pytest.raises(ablate.AblationError, match=message):
        plan(*argv)


def test_train_tokens_become_iterations_per_run():
    p = plan("--base", "PRESET=smoke", "--variant", "bigbatch=TRAIN_BATCH_TOKENS=16384",
             "--variant", "given=TRAIN_BATCH_TOKENS=1024", "--train-tokens", "100000")
    by_variant = {r.variant: r.env for r in p.runs}
    # smoke preset: TRAIN_BATCH_TOKENS=8192 -> ceil(100000 / 8192) = 13 steps; 16384 -> 7; 1024 -> 98
    assert by_variant["base"]["ITERATIONS"] == "13" and by_variant["base"]["MAX_WALLCLOCK_SECONDS"] == "0"
    assert by_variant["bigbatch"]["ITERATIONS"] == "7"
    assert by_variant["given"]["ITERATIONS"] == "98"
    assert ablate.iterations_for_tokens(8192, 8192) == 1 and ablate.iterations_for_tokens(8193, 8192) == 2


def test_plan_file(tmp_path):
    f = tmp_path / "plan.args"
    f.write_text("# a plan\n--name\nfromfile\n--base PRESET=smoke\n\n--variant lr=MATRIX_LR=0.02\n--seeds 4,5\n")
    args = ablate.parse_args([f"@{f}"])
    p = ablate.Plan(args)
    assert p.name == "fromfile" and p.seeds == [4, 5] and p.variants == [("base", {}), ("lr", {"MATRIX_LR": "0.02"})]
    assert "--variant lr=MATRIX_LR=0.02" in p.canonical_command()


def test_env_matches_parses_like_the_trainer():
    assert ablate.env_matches("1", True) and ablate.env_matches("off", False) and not ablate.env_matches("1", False)
    assert ablate.env_matches("0", 0.0) and ablate.env_matches("0.05", 0.05) and not ablate.env_matches("0.5", 0.05)
    assert ablate.env_matches("6", 6) and not ablate.env_matches("6.5", 6)
    assert ablate.env_matches("ema", "ema") and not ablate.env_matches("swa", "ema")


# ---------------------------------------------------------------------------------------------------------
# statistics against hand computations
# ---------------------------------------------------------------------------------------------------------

A = [1.2010, 1.2030, 1.2026]
B = [1.1990, 1.2001, 1.1985, 1.1998]


def test_mean_and_sample_std_by_hand():
    m, sd, n = ablate.mean_std(A)
    assert n == 3 and m == pytest.approx((1.2010 + 1.2030 + 1.2026) / 3, abs=1e-15)
    by_hand = math.sqrt(((1.2010 - m) ** 2 + (1.2030 - m) ** 2 + (1.2026 - m) ** 2) / 2)
    assert sd == pytest.approx(by_hand, rel=1e-12)
    assert ablate.mean_std([1.5]) == (1.5, None, 1) and ablate.mean_std([]) == (None, None, 0)


def test_welch_two_sided_by_hand_and_scipy():
    w = ablate.welch_two_sided(B, A)
    va, vb = statistics.variance(B) / 4, statistics.variance(A) / 3
    t = (statistics.fmean(B) - statistics.fmean(A)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    assert w["t"] == pytest.approx(t, rel=1e-12) and w["dof"] == pytest.approx(dof, rel=1e-12)
    # two-sided p from the project's own incomplete-beta Student-t, independent of scipy
    assert w["p_value"] == pytest.approx(2 * ablate.ms.student_t_sf_builtin(abs(t), dof), rel=1e-9)
    assert 0 < w["p_value"] < 0.05  # B is clearly lower than A here
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.ttest_ind(B, A, equal_var=False)
    assert w["t"] == pytest.approx(float(ref.statistic), rel=1e-10)
    assert w["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-8)
    if hasattr(ref, "df"):
        assert w["dof"] == pytest.approx(float(ref.df), rel=1e-10)


def test_welch_symmetric_and_undefined_cases():
    w1, w2 = ablate.welch_two_sided(A, B), ablate.welch_two_sided(B, A)
    assert w1["t"] == pytest.approx(-w2["t"]) and w1["p_value"] == pytest.approx(w2["p_value"])
    assert ablate.welch_two_sided([1.0], B) is None  # one seed: no variance estimate
    assert ablate.welch_two_sided([1.0, 1.0], [2.0, 2.0]) is None  # zero variance on both sides
    assert ablate.welch_two_sided([1.0, 1.0], [1.0, 1.0 + 1e-3])["p_value"] <= 1.0


def test_paired_t_test_by_hand_and_scipy():
    variant, base = [1.2040, 1.2051, 1.2049], [1.2010, 1.2030, 1.2026]
    p = ablate.paired_two_sided(list(zip(variant, base)))
    d = [a - b for a, b in zip(variant, base)]
    se = statistics.stdev(d) / math.sqrt(3)
    assert p["mean"] == pytest.approx(statistics.fmean(d), abs=1e-15) and p["se"] == pytest.approx(se, rel=1e-12)
    assert p["t"] == pytest.approx(statistics.fmean(d) / se, rel=1e-12) and p["dof"] == 2 and p["n"] == 3
    assert p["p_value"] == pytest.approx(2 * ablate.ms.student_t_sf_builtin(abs(p["t"]), 2), rel=1e-9)
    # pairing removes the seed spread that makes the unpaired test weak here
    assert p["p_value"] < ablate.welch_two_sided(variant, base)["p_value"]
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.ttest_rel(variant, base)
    assert p["t"] == pytest.approx(float(ref.statistic), rel=1e-10)
    assert p["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-8)


def test_paired_t_test_degenerate_cases():
    assert ablate.paired_two_sided([(1.0, 2.0)]) is None  # one pair: no spread estimate
    same = ablate.paired_two_sided([(1.0, 1.0), (2.0, 2.0)])
    assert same["mean"] == 0 and same["t"] is None and ablate.fmt_paired(same) == "+0.000000 (identical per seed)"
    shifted = ablate.paired_two_sided([(1.5, 1.0), (2.5, 2.0)])
    assert shifted["t"] is None and ablate.fmt_paired(shifted) == "+0.500000 (no spread)"


# ---------------------------------------------------------------------------------------------------------
# the tiny 2 variants x 2 seeds ablation, end to end
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The session's tiny ablation (run once, shared with test_make_record.py)."""
    result = th.tiny_ablation(tmp_path_factory)
    assert result["rc"] == 0, result["stdout"][-3000:] + result["stderr"][-3000:]
    return result


def summaries_of(out_dir):
    """{run_id: summary} of every run summary under out_dir/runs."""
    return {p.name[:-len(".summary.json")]: json.loads(p.read_text())
            for p in sorted((out_dir / "runs").glob("*.summary.json"))}


def variant_rows(md):
    """{variant: cells} of the main results table in results.md."""
    lines = md.split("## Runs")[0].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| Variant |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_all_runs_and_table(tiny):
    out = tiny["out_dir"]
    runs = summaries_of(out)
    assert sorted(runs) == ["tiny_base_s1", "tiny_base_s2", "tiny_lr_s1", "tiny_lr_s2"]
    for run_id, s in runs.items():
        assert s["run_id"] == run_id and s["seed"] == int(run_id[-1]) and s["status"] == "ok"
        assert s["steps"] == th.ITERATIONS and s["config"]["max_wallclock_seconds"] == 0
        assert (out / "runs" / f"{run_id}.txt").exists() and (out / "runs" / f"{run_id}.meta.json").exists()
        assert json.loads((out / "runs" / f"{run_id}.meta.json").read_text())["returncode"] == 0
    assert {s["config"]["matrix_lr"] for k, s in runs.items() if "_lr_" in k} == {0.05}
    assert {s["config"]["matrix_lr"] for k, s in runs.items() if "_base_" in k} == {0.03}
    md = (out / "results.md").read_text()
    rows = variant_rows(md)
    assert set(rows) == {"base", "lr"} and rows["base"]["n"] == "2" and rows["lr"]["n"] == "2"
    # every aggregate equals a hand computation over the summaries
    for variant in ("base", "lr"):
        group = [s for k, s in runs.items() if f"_{variant}_" in k]
        ttt = [s["results"]["quantized_ttt"]["val_bpb"] for s in group]
        assert rows[variant]["TTT val_bpb"] == f"{statistics.fmean(ttt):.6f} ± {statistics.stdev(ttt):.6f}"
        pre = [s["results"]["pre_quantization_post_ema"]["val_bpb"] for s in group]
        assert rows[variant]["Pre-quant val_bpb"] == f"{statistics.fmean(pre):.6f} ± {statistics.stdev(pre):.6f}"
        mps = [s["train_time_ms"] / s["steps"] for s in group]
        assert rows[variant]["ms/step"] == f"{statistics.fmean(mps):.1f} ± {statistics.stdev(mps):.1f}"
        assert rows[variant]["Artifact bytes"] == f"{statistics.fmean(s['bytes_total'] for s in group):,.0f}"
    base_ttt = [s["results"]["quantized_ttt"]["val_bpb"] for k, s in runs.items() if "_base_" in k]
    lr_ttt = [s["results"]["quantized_ttt"]["val_bpb"] for k, s in runs.items() if "_lr_" in k]
    delta = statistics.fmean(lr_ttt) - statistics.fmean(base_ttt)
    assert rows["lr"]["Δ TTT vs base"].startswith(f"{delta:+.6f} ± ")
    res = json.loads((out / "results.json").read_text())
    lr = next(v for v in res["variants"] if v["variant"] == "lr")
    assert lr["delta"]["mean"] == pytest.approx(delta, abs=1e-15)
    assert lr["welch"]["p_value"] == pytest.approx(ablate.welch_two_sided(lr_ttt, base_ttt)["p_value"])
    pairs = [(runs[f"tiny_lr_s{seed}"]["results"]["quantized_ttt"]["val_bpb"],
              runs[f"tiny_base_s{seed}"]["results"]["quantized_ttt"]["val_bpb"]) for seed in th.SEEDS]
    assert lr["paired"] == ablate.paired_two_sided(pairs) and lr["paired"]["n"] == 2
    assert rows["lr"]["Δ paired by seed"] == ablate.fmt_paired(lr["paired"])
    assert f"Seed-to-seed std of base (TTT val_bpb): {statistics.stdev(base_ttt):.6f} (n=2)" in md
    assert "Failed runs: none." in md and res["metric"] == "quantized_ttt"
    assert "--variant lr=MATRIX_LR=0.05" in md and "MATRIX_LR=0.05 python3" in md


def test_rerun_does_not_rerun_and_reproduces_table(tiny):
    out = tiny["out_dir"]
    files = sorted(p for p in (out / "runs").iterdir() if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    before = {name: (out / name).read_bytes() for name in ("results.md", "results.json")}
    rc, stdout, _ = th.call(ablate.main, tiny["args"])
    assert rc == 0
    assert stdout.count("skip tiny_") == 4 and "running" not in stdout
    assert sorted(p for p in (out / "runs").iterdir() if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # no log, summary or meta touched
    assert {name: (out / name).read_bytes() for name in before} == before


def copy_runs(tiny, tmp_path):
    """A copy of the tiny ablation's out dir (runs only) to mutate; returns its path."""
    out = tmp_path / th.NAME
    shutil.copytree(tiny["out_dir"] / "runs", out / "runs")
    return out


def edit_summary(out, run_id, fn):
    """Apply fn to one copied summary in place."""
    path = out / "runs" / f"{run_id}.summary.json"
    s = json.loads(path.read_text())
    fn(s)
    path.write_text(json.dumps(s))


def test_different_data_is_refused(tiny, tmp_path, tmp_path_factory):
    out = copy_runs(tiny, tmp_path)
    edit_summary(out, "tiny_lr_s2", lambda s: s["fingerprint"].update(tokenizer_sha256="0" * 64))
    rc, stdout, stderr = th.call(ablate.main, th.ablation_args(tmp_path_factory, out))
    assert rc == 2
    assert "tiny_lr_s2" in stderr and "fingerprint.tokenizer_sha256" in stderr and "different data" in stderr
    assert not (out / "results.md").exists() and "running" not in stdout


def other_tokens_same_text(s):
    """Make a summary look tokenized differently (another tokenizer, twice the tokens at half the loss per
    token) while scoring the same validation bytes."""
    s["fingerprint"].update(tokenizer_sha256="f" * 64, val_tokens=2 * s["fingerprint"]["val_tokens"])
    s["legality"]["scored_tokens"] *= 2
    for r in s["results"].values():
        if isinstance(r, dict) and "val_loss" in r:
            r["val_loss"] /= 2


def test_data_variant_may_change_tokens_but_not_the_text(tiny, tmp_path, tmp_path_factory):
    out = copy_runs(tiny, tmp_path)
    for seed in th.SEEDS:
        edit_summary(out, f"tiny_lr_s{seed}", other_tokens_same_text)
    args = th.ablation_args(tmp_path_factory, out)
    rc, _, stderr = th.call(ablate.main, args)  # without the flag: different data, refused
    assert rc == 2 and "fingerprint.tokenizer_sha256" in stderr
    rc, stdout, stderr = th.call(ablate.main, args + ["--data-variant", "lr"])
    assert rc == 0, stderr
    assert "running" not in stdout
    base = summaries_of(out)["tiny_base_s1"]
    md = (out / "results.md").read_text()
    assert f"validation bytes scored, checked per run: base {round(ablate.implied_val_bytes(base)):,}" in md
    assert "those of lr" in md
    # the same tokens count but a BPB that implies other bytes: not the same validation text
    edit_summary(out, "tiny_lr_s2", lambda s: [r.update(val_bpb=r["val_bpb"] * 1.01)
                                               for r in s["results"].values() if isinstance(r, dict) and "val_bpb" in r])
    rc, _, stderr = th.call(ablate.main, args + ["--data-variant", "lr"])
    assert rc == 2 and "tiny_lr_s2" in stderr and "same validation text" in stderr
    rc, _, stderr = th.call(ablate.main, args + ["--data-variant", "lr", "--val-bytes-rtol", "0.02"])
    assert rc == 0, stderr  # a 1% difference (text cut elsewhere) passes an explicit 2% tolerance, shown in the table
    assert "allowed to differ by 2.00%" in (out / "results.md").read_text()


def test_data_variant_must_name_a_variant():
    with pytest.raises(ablate.AblationError, match="--data-variant nope: not the label of a --variant"):
        plan("--variant", "lr=MATRIX_LR=0.05", "--data-variant", "nope")


def test_different_val_tokens_is_refused(tiny, tmp_path, tmp_path_factory):
    out = copy_runs(tiny, tmp_path)
    edit_summary(out, "tiny_base_s2", lambda s: s["fingerprint"].update(val_tokens=4096))
    rc, _, stderr = th.call(ablate.main, th.ablation_args(tmp_path_factory, out))
    assert rc == 2 and "tiny_base_s2" in stderr and "fingerprint.val_tokens" in stderr


def test_different_base_config_is_refused(tiny, tmp_path, tmp_path_factory):
    out = copy_runs(tiny, tmp_path)
    edit_summary(out, "tiny_lr_s1", lambda s: s["config"].update(rope_base=20000.0))
    rc, _, stderr = th.call(ablate.main, th.ablation_args(tmp_path_factory, out))
    assert rc == 2 and "tiny_lr_s1" in stderr and "rope_base" in stderr and "does not set ROPE_BASE" in stderr


def test_stale_plan_is_refused(tiny, tmp_path_factory):
    # same out dir, but the variant now means something else: the existing summaries do not belong to it
    rc, stdout, stderr = th.call(ablate.main, th.ablation_args(tmp_path_factory, tiny["out_dir"],
                                                                variant=("lr", "MATRIX_LR=0.07")))
    assert rc == 2 and "tiny_lr_s1" in stderr and "matrix_lr=0.05" in stderr and "MATRIX_LR=0.07" in stderr
    assert "running" not in stdout


def test_failed_run_is_reported_not_averaged_and_not_retried(tiny, tmp_path, tmp_path_factory):
    out = copy_runs(tiny, tmp_path)
    edit_summary(out, "tiny_lr_s2", lambda s: s.update(status="diverged", error="non-finite train loss at step 5"))
    stamp = (out / "runs" / "tiny_lr_s2.summary.json").stat().st_mtime_ns
    rc, stdout, _ = th.call(ablate.main, th.ablation_args(tmp_path_factory, out))
    assert rc == 1 and "skip tiny_lr_s2: failed (diverged" in stdout and "running" not in stdout
    assert (out / "runs" / "tiny_lr_s2.summary.json").stat().st_mtime_ns == stamp
    md = (out / "results.md").read_text()
    rows = variant_rows(md)
    assert rows["lr"]["n"] == "1 (+1 failed)" and rows["base"]["n"] == "2"
    lr_s1 = json.loads((out / "runs" / "tiny_lr_s1.summary.json").read_text())
    assert rows["lr"]["TTT val_bpb"] == f"{lr_s1['results']['quantized_ttt']['val_bpb']:.6f}"  # n=1: no ± and no mix
    assert rows["lr"]["p (Welch, two-sided)"] == "—"
    assert "tiny_lr_s2: failed — diverged: non-finite train loss at step 5" in md
    # --retry-failed would rerun exactly that run (dry run: nothing launched, nothing moved)
    rc, stdout, _ = th.call(ablate.main, th.ablation_args(tmp_path_factory, out, extra=["--retry-failed", "--dry-run"]))
    assert rc == 0 and re.findall(r"would run (\S+)", stdout) == ["tiny_lr_s2"]
    assert (out / "runs" / "tiny_lr_s2.summary.json").exists()


def test_interrupted_and_missing_runs_are_rerun(tiny, tmp_path, tmp_path_factory):
    out = copy_runs(tiny, tmp_path)
    meta = out / "runs" / "tiny_base_s2.meta.json"
    m = json.loads(meta.read_text())
    del m["returncode"]  # the runner was killed while this run was going
    meta.write_text(json.dumps(m))
    edit_summary(out, "tiny_base_s2", lambda s: s.pop("eval_seconds"))
    for p in (out / "runs").glob("tiny_lr_s1.*"):
        p.unlink()
    rc, stdout, _ = th.call(ablate.main, th.ablation_args(tmp_path_factory, out, extra=["--dry-run"]))
    assert rc == 0 and re.findall(r"would run (\S+) \((\w+)\)", stdout) == [("tiny_base_s2", "interrupted"),
                                                                            ("tiny_lr_s1", "pending")]


def test_variant_that_is_no_config_field_is_refused(tmp_path, tmp_path_factory):
    rc, _, stderr = th.call(ablate.main, th.ablation_args(tmp_path_factory, tmp_path / "x",
                                                          variant=("smear", "SMEAR_GATEE=1"), extra=["--dry-run"]))
    assert rc == 2 and "SMEAR_GATEE is not a config field" in stderr


# ---------------------------------------------------------------------------------------------------------
# curves
# ---------------------------------------------------------------------------------------------------------


def test_curves_png_is_a_real_plot_of_every_run(tiny, tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")  # optional: without it ablate writes no curves.png
    png = tiny["out_dir"] / "curves.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    image = mpimg.imread(str(png))
    assert image.shape[0] > 400 and image.shape[1] > 600 and image.std() > 0.01  # decodable, not blank
    runs = summaries_of(tiny["out_dir"])
    p = ablate.Plan(ablate.parse_args(tiny["args"]))
    p.resolve(None)
    series = ablate.curve_series(p, runs)
    fig = ablate.plot_curves(series, tmp_path / "again.png")
    titles = [name for name, *_ in ablate.PANELS]
    for ax, name in zip(fig.axes, titles):
        lines = ax.get_lines()
        assert len(lines) == len(runs) == 4, name
        for line, sr in zip(lines, series[name]):
            s = runs[sr["run_id"]]
            if name.startswith("train"):
                steps = [row[0] for row in s["curves"]["train"]]
                times = [row[1] / 1000 for row in s["curves"]["train"]]
                assert list(line.get_ydata()) == [row[2] for row in s["curves"]["train"]]
            else:
                steps = [row[0] for row in s["curves"]["val"]]
                times = [row[1] / 1000 for row in s["curves"]["val"]]
                assert list(line.get_ydata()) == [row[3] for row in s["curves"]["val"]]
            assert list(line.get_xdata()) == (steps if name.endswith("step") else times)
        assert [ln.get_linestyle() for ln in lines] == ["-", "--", "-", "--"]  # one style per seed
        colors = [ln.get_color() for ln in lines]
        assert colors[0] == colors[1] != colors[2] == colors[3]  # one colour per variant
    assert [row[0] for row in runs["tiny_base_s1"]["curves"]["train"]] == list(range(1, th.ITERATIONS + 1))


def test_without_matplotlib_a_note_instead_of_the_png(tiny, tmp_path, tmp_path_factory, monkeypatch):
    out = copy_runs(tiny, tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, stdout, _ = th.call(ablate.main, th.ablation_args(tmp_path_factory, out))
    assert rc == 0 and "note: matplotlib is not installed, curves.png not written" in stdout
    assert (out / "results.md").exists() and not (out / "curves.png").exists()
