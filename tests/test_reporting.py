"""Reporting: console-only progress of long stages, the per-run curves PNG, FLOPs/MFU lines in the log."""
import json
import re

import pytest

import pipeline_helpers as ph


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return ph.tiny_pipeline(tmp_path_factory)


def test_long_stages_report_progress_on_the_console_only(tiny_run):
    """Hessians, GPTQ, compression, sliding eval and TTT print done/total with an ETA to stdout; none of it
    reaches the log file (whose record-format lines tools parse)."""
    out = tiny_run["stdout"]
    for stage in ("hessians", "gptq", "sliding eval", "ttt chunks"):
        found = re.findall(rf"^\[progress\] {stage}: (\d+)/(\d+) \(\d+%\) elapsed \d+s eta \d+s$", out, re.M)
        assert found and found[-1][0] == found[-1][1], stage  # ends at done == total
    assert re.search(r"^\[progress\] compressing [\d.]+M values with brotli", out, re.M)
    assert "[progress]" not in tiny_run["log"]


def test_run_writes_a_curves_png_next_to_its_log(tiny_run):
    """A valid PNG with the run's curves: four panels whose train-loss line has one point per step."""
    mpimg = pytest.importorskip("matplotlib.image")  # optional at run time (the test below covers its absence)
    png = tiny_run["dir"] / "tiny_source.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    img = mpimg.imread(str(png))
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert re.search(rf"^plot: {re.escape(str(png))}$", tiny_run["log"], re.M)
    summary = json.loads((tiny_run["dir"] / "tiny_source.summary.json").read_text())
    assert [row[0] for row in summary["curves"]["train"]] == list(range(1, summary["steps"] + 1))


def test_plot_without_matplotlib_is_a_one_line_note(monkeypatch):
    import builtins
    import train_gpt as tg
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real(name, *a, **k))
    assert tg.write_run_plot({}, "x.png").startswith("plot: matplotlib is not installed")


def test_perf_lines_report_flops_and_throughput(tiny_run):
    """Every train log step has a perf line with the FLOPs/token of the current layout and TFLOP/s."""
    perf = re.findall(r"^perf: step:(\d+) window_tok/s:(\d+) flops/token:([\d.]+)M tflops/device:([\d.]+)",
                      tiny_run["log"], re.M)
    steps = re.findall(r"^(\d+)/\d+ train_loss:", tiny_run["log"], re.M)
    assert [p[0] for p in perf] == steps and all(float(p[3]) > 0 for p in perf)
    assert len({p[2] for p in perf}) == 2  # plain and looped layouts differ in FLOPs
    assert re.search(r"^perf: run mean [\d.]+ TFLOP/s per device$", tiny_run["log"], re.M)  # no MFU on CPU
