"""Tests for tools/make_record.py on the tiny ablation's base runs: the folder's files, every README number
against the logs, the reconstructed run command, code-size / code-identity refusals, and a byte-identical
regeneration of submission.json from the folder's own logs."""
import dataclasses
import json
import re
import shlex
import statistics
import textwrap

import pytest

import tools_helpers as th
from conftest import tg

make_record = th.load_tool("make_record")
ms = th.load_tool("make_submission")

META = ["--author", "Tools Test", "--github-id", "tools", "--name", "Tiny CPU evidence",
        "--blurb", "Two tiny CPU seeds of the smoke preset.", "--allow-nonrecord"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(summary paths of the tiny ablation's two base seeds, the packed trainer they ran)."""
    result = th.tiny_ablation(tmp_path_factory)
    assert result["rc"] == 0, result["stdout"][-3000:] + result["stderr"][-3000:]
    paths = [result["out_dir"] / "runs" / f"{th.NAME}_base_s{seed}.summary.json" for seed in th.SEEDS]
    return paths, th.packed_trainer(tmp_path_factory)


@pytest.fixture(scope="module")
def record(runs, tmp_path_factory):
    """A record folder built from the two base runs, shipping the packed file that ran."""
    paths, packed = runs
    out = tmp_path_factory.mktemp("records") / "2026_tiny"
    rc, stdout, stderr = th.call(make_record.main, ["--logs", *paths, "--out", out, *META, "--packed", packed])
    assert rc == 0, stderr
    return out


def summaries(paths):
    """The summaries as dicts, sorted by seed."""
    return sorted((json.loads(p.read_text()) for p in paths), key=lambda s: s["seed"])


def readme_table(readme):
    """(header, rows) of the README's results table: each row a list of cell strings."""
    lines = readme.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| Seed |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return header, rows


def fake_source(tmp_path, packed, transform):
    """A trainer dir whose `train_gpt.py pack OUT` writes transform(packed bytes), plus requirements.txt."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "requirements.txt").write_text("torch\n")
    (src / "train_gpt.py").write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        assert sys.argv[1] == "pack"
        data = Path({str(packed)!r}).read_bytes()
        Path(sys.argv[2]).write_bytes({transform})
    """))
    return src / "train_gpt.py"


def test_folder_holds_the_five_kinds_of_files(record, runs):
    paths, packed = runs
    names = sorted(p.name for p in record.iterdir())
    for s in summaries(paths):
        assert f"{s['run_id']}.txt" in names and f"{s['run_id']}.summary.json" in names
        original = paths[0].parent / f"{s['run_id']}.summary.json"
        assert (record / original.name).read_bytes() == original.read_bytes()
    for name in ("README.md", "submission.json", "train_gpt.py", "requirements.txt"):
        assert name in names
    shipped = (record / "train_gpt.py").read_bytes()
    assert shipped == packed.read_bytes()
    assert {s["bytes_code"] for s in summaries(paths)} == {len(shipped)}
    assert (record / "requirements.txt").read_text() == (th.ROOT / "requirements.txt").read_text()
    assert not [p for p in record.parent.iterdir() if p.name.startswith(".")]  # no staging dir left behind


def test_every_readme_number_equals_the_logs(record, runs):
    paths, _ = runs
    ss = summaries(paths)
    readme = (record / "README.md").read_text()
    header, rows = readme_table(readme)
    assert header == list(make_record.TABLE_HEADER) and len(rows) == len(ss) + 1
    stages = ms.TABLE_STAGES
    for s, row in zip(ss, rows):
        log = (record / f"{s['run_id']}.txt").read_text()
        assert int(row[0]) == s["seed"] and int(row[1]) == s["steps"]
        assert float(row[2]) == s["train_time_ms"]
        for cell, stage, log_name in zip(row[3:7], stages, ("pre-quantization post-ema", "quantized",
                                                             "quantized_sliding_window", "quantized_ttt")):
            assert cell == f"{s['results'][stage]['val_bpb']:.8f}"
            # and the same digits as the run's own log line
            logged = re.findall(rf"^{re.escape(log_name)} val_loss:\S+ val_bpb:(\S+)", log, flags=re.M)
            assert logged == [cell], (stage, logged, cell)
        assert int(row[7].replace(",", "")) == s["bytes_total"]
        assert int(row[8].replace(",", "")) == s["bytes_code"]
    mean_row = rows[-1]
    assert mean_row[0] == "**Mean ± std**"

    def mean_std(values, spec):
        return format(statistics.fmean(values), spec) + " ± " + format(statistics.stdev(values), spec)

    assert mean_row[2] == mean_std([s["train_time_ms"] for s in ss], ".1f")
    for cell, stage in zip(mean_row[3:7], stages):
        assert cell == mean_std([s["results"][stage]["val_bpb"] for s in ss], ".8f")
    assert mean_row[7] == mean_std([s["bytes_total"] for s in ss], ",.1f")
    ttt = [s["results"]["quantized_ttt"]["val_bpb"] for s in ss]
    assert f"quantized_ttt val_bpb {statistics.fmean(ttt):.8f} ± {statistics.stdev(ttt):.8f}** (" in readme
    assert "- Hardware: CPU (" in readme and "non_record_16mb" in readme and "- Preset: smoke" in readme


def test_run_command_reproduces_the_config(record, runs):
    paths, _ = runs
    readme = (record / "README.md").read_text()
    block = readme.split("## Run command")[1].split("```bash\n")[1].split("```")[0]
    assert block.startswith("for SEED in 1 2; do") and "python3 train_gpt.py" in block
    words = shlex.split(block.replace("\\\n", " ").splitlines()[1])
    env = dict(w.split("=", 1) for w in words if "=" in w and w.split("=", 1)[0].isupper())
    assert env.pop("SEED") == "$SEED" and env["PRESET"] == "smoke" and env["ITERATIONS"] == str(th.ITERATIONS)
    assert "VOCAB_SIZE" not in env  # equal to the smoke default: not repeated
    skip = {"run_id", "log_dir", "artifact_path"}
    for s in summaries(paths):
        cfg = dataclasses.asdict(tg.load_config(dict(env, SEED=str(s["seed"]), RUN_ID=s["run_id"])))
        want = {k: v for k, v in s["config"].items() if k not in skip}
        assert {k: v for k, v in cfg.items() if k not in skip} == want


def test_code_size_mismatch_is_refused(runs, tmp_path):
    paths, packed = runs
    src = fake_source(tmp_path, packed, "data + b'# one more line\\n'")
    out = tmp_path / "rec"
    rc, _, stderr = th.call(make_record.main, ["--logs", *paths, "--out", out, *META, "--source", src])
    assert rc == 2 and not out.exists()
    size = packed.stat().st_size
    assert f"is {size + 16:,} bytes but the runs counted bytes_code={size:,}" in stderr
    assert "--allow-code-mismatch" in stderr
    rc, _, stderr = th.call(make_record.main, ["--logs", *paths, "--out", out, *META, "--source", src,
                                               "--allow-code-mismatch"])
    assert rc == 0 and "shipped anyway" in stderr
    assert "**Code mismatch, shipped anyway (--allow-code-mismatch):**" in (out / "README.md").read_text()


def test_same_size_different_code_is_refused(runs, tmp_path):
    paths, packed = runs
    src = fake_source(tmp_path, packed, "data[:-2] + bytes([data[-2] ^ 1]) + data[-1:]")
    rc, _, stderr = th.call(make_record.main, ["--logs", *paths, "--out", tmp_path / "rec", *META, "--source", src])
    assert rc == 2 and "the run's code sha256" in stderr and "bytes_code" not in stderr


def test_default_path_packs_the_source(runs, tmp_path):
    paths, packed = runs
    src = fake_source(tmp_path, packed, "data")  # packs to exactly the file that ran
    out = tmp_path / "rec"
    rc, _, stderr = th.call(make_record.main, ["--logs", *paths, "--out", out, *META, "--source", src])
    assert rc == 0, stderr
    assert (out / "train_gpt.py").read_bytes() == packed.read_bytes()
    assert (out / "requirements.txt").read_text() == "torch\n"


def test_default_path_packs_for_the_switches_the_runs_counted(runs, tmp_path):
    """The source is packed with the runs' code_packed_for values in its environment, and the unset-only fields
    whose code the counted copy keeps (code_pack_keeps) set; runs counted for different values, or for a copy
    packed by another Python version, cannot make the folder."""
    paths, packed = runs
    switches = {"preset": "smoke", "smear_gate": False, "compressor": "brotli", "export_from": ""}
    copies = []
    for p in paths:
        data = json.loads(p.read_text())
        data["code_packed_for"], data["code_pack_keeps"] = switches, ["float_checkpoint"]
        copies.append(tmp_path / p.name)
        copies[-1].write_text(json.dumps(data))
        for suffix in (".txt", ".meta.json"):
            log = p.parent / p.name.replace(".summary.json", suffix)
            if log.exists():
                (tmp_path / log.name).write_bytes(log.read_bytes())
    seen = tmp_path / "pack_env.json"
    src = fake_source(tmp_path, packed, "data")
    src.write_text(src.read_text().replace(
        "data = Path(", f"import json, os; Path({str(seen)!r}).write_text(json.dumps(dict(os.environ)))\ndata = Path("))
    rc, _, stderr = th.call(make_record.main, ["--logs", *copies, "--out", tmp_path / "rec", *META, "--source", src])
    assert rc == 0, stderr
    env = json.loads(seen.read_text())
    assert (env["PRESET"], env["SMEAR_GATE"], env["COMPRESSOR"], env["EXPORT_FROM"]) == ("smoke", "0", "brotli", "")
    assert env["FLOAT_CHECKPOINT"] == "kept"
    data = json.loads(copies[1].read_text())
    data["code_packed_by_python"] = "3.99"
    copies[1].write_text(json.dumps(data))
    rc, _, stderr = th.call(make_record.main, ["--logs", *copies, "--out", tmp_path / "rec3", *META, "--source", src])
    assert rc == 2 and "packed by Python 3.99" in stderr
    data["code_packed_by_python"] = None
    copies[1].write_text(json.dumps(data))
    data = json.loads(copies[0].read_text())
    data["code_packed_for"] = dict(switches, preset="record")
    copies[0].write_text(json.dumps(data))
    rc, _, stderr = th.call(make_record.main, ["--logs", *copies, "--out", tmp_path / "rec2", *META, "--source", src])
    assert rc == 2 and "different switch values" in stderr


def test_existing_folder_needs_force(record, runs):
    paths, packed = runs
    rc, _, stderr = th.call(make_record.main, ["--logs", *paths, "--out", record, *META, "--packed", packed])
    assert rc == 2 and "--force" in stderr


def test_submission_json_regenerates_byte_identically(record, runs, tmp_path, monkeypatch):
    paths, packed = runs
    committed = (record / "submission.json").read_bytes()
    sub = json.loads(committed)
    assert sub["track"] == "non_record_16mb" and sub["hardware"].startswith("CPU (")
    assert sub["date"] == max(json.loads((record / f"{s['run_id']}.meta.json").read_text())["finished_utc"]
                              for s in summaries(paths))[:10]
    # the README's own command, run inside the folder on the copied logs, gives the same bytes
    readme = (record / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith('python3 "$REPO/tools/make_submission.py" '))
    argv = shlex.split(line)[2:]
    assert argv[argv.index("--out") + 1] == "submission.json"
    argv[argv.index("--out") + 1] = str(tmp_path / "regenerated.json")
    monkeypatch.chdir(record)
    rc, _, stderr = th.call(ms.main, argv)
    assert rc == 0, stderr
    assert (tmp_path / "regenerated.json").read_bytes() == committed
    # and a second record folder from the same logs is identical file for file
    again = tmp_path / "again"
    rc, _, stderr = th.call(make_record.main, ["--logs", *paths, "--out", again, *META, "--packed", packed])
    assert rc == 0, stderr
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in record.iterdir())
    for p in record.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
