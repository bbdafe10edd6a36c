#!/usr/bin/env python3
"""Assemble a challenge record folder from run logs: README, submission.json, logs, packed code, requirements.

    python3 tools/make_record.py --logs logs/s1.summary.json logs/s2.summary.json logs/s3.summary.json \
        --out records/track_10min_16mb/2026-05-01_MyRecord \
        --author "Your Name" --github-id you --name "My record" --blurb "What changed" \
        [--allow-nonrecord] [--baseline-bpb B --baseline-std S --baseline-n N] [--metric STAGE] [--date YYYY-MM-DD]
        [--source train_gpt.py | --packed dist/train_gpt.py] [--allow-code-mismatch] [--force]

The folder gets README.md (per-seed results table, mean ± sample std, the run command reconstructed from the
config values that differ from the preset's defaults, code provenance), submission.json (tools/make_submission.py,
deterministic: dated from the runs), every run's <RUN_ID>.txt, <RUN_ID>.summary.json (and the runner's
<RUN_ID>.meta.json when present), the packed train_gpt.py (`python3 train_gpt.py pack`, run in the source's
directory with the switch values the runs were counted for, or the already-packed file given by --packed) and
requirements.txt from the source's directory.

The shipped code must be the code that was counted and run: the packed file's size must equal every summary's
bytes_code, and the sha256 in the logs' `source:` line must be that of the shipped file or of the source it was
packed from. Otherwise the folder is refused unless --allow-code-mismatch (the README then says so).
"""
import argparse
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
ROOT = TOOLS_DIR.parent
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))
import ablate  # noqa: E402  (import_script: load a trainer, readable or packed)
import make_submission as ms  # noqa: E402

SOURCE_LINE = re.compile(r"^source: (\S+) sha256:([0-9a-f]{64})\s*$", re.M)
# Config keys left out of the reconstructed command: the seed loops, ids and output paths are bookkeeping.
COMMAND_SKIP_KEYS = frozenset({"seed", "run_id", "log_dir", "artifact_path", "preset"})
TABLE_HEADER = ("Seed", "Steps", "Train time (ms)", "Pre-quant val_bpb", "Quantized val_bpb", "Sliding val_bpb",
                "TTT val_bpb", "Artifact bytes", "Code bytes")


class RecordError(Exception):
    """Inputs that cannot become an honest record folder; the message says which file and why."""


def sha256_bytes(data):
    """Hex sha256 of a bytes object."""
    return hashlib.sha256(data).hexdigest()


def logged_source_shas(summary):
    """sha256 values of the `source:` lines in the run's .txt log (the file that actually ran)."""
    path = ms.log_path(summary)
    if not path.exists():
        raise RecordError(f"{summary['_path']}: its log {path} is missing (the record ships both)")
    return sorted(set(sha for _name, sha in SOURCE_LINE.findall(path.read_text(encoding="utf-8", errors="replace"))))


def packed_for(summaries):
    """The switch values the runs' code bytes were counted for (summary key code_packed_for; {} when absent),
    which must be the same for every run."""
    found = {json.dumps(s.get("code_packed_for", {}), sort_keys=True) for s in summaries}
    if len(found) > 1:
        raise RecordError(f"the runs counted code packed for different switch values ({' vs '.join(sorted(found))}): "
                          f"one record folder ships one train_gpt.py")
    return json.loads(found.pop())


def pack_settings(summaries):
    """(switch values, unset-only fields whose code the counted copy keeps) of the runs (summary keys
    code_packed_for, code_pack_keeps); RecordError if they were counted by another Python version than this
    one, whose ast.unparse writes a different packed copy."""
    versions = sorted({s["code_packed_by_python"] for s in summaries if s.get("code_packed_by_python")})
    here = "{}.{}".format(*sys.version_info[:2])
    if versions and versions != [here]:
        raise RecordError(f"the runs' code bytes were counted for a copy packed by Python {', '.join(versions)}, "
                          f"and this is Python {here} (ast.unparse output differs between versions): run "
                          f"tools/make_record.py with python{versions[0]}, or ship the file the runs packed with "
                          f"--packed")
    keeps = sorted({k for s in summaries for k in s.get("code_pack_keeps", [])})
    return packed_for(summaries), keeps


def pack_code(source, workdir, switches=None, keeps=()):
    """Run `python3 <source> pack <workdir>/train_gpt.py` in the source's directory with the runs' switch values
    in the environment and each field in `keeps` set (so it packs what they counted); returns the packed bytes."""
    out = Path(workdir) / "train_gpt.py"
    env = dict(os.environ, **{k.upper(): env_value(v) for k, v in (switches or {}).items()},
               **{k.upper(): "kept" for k in keeps})
    proc = subprocess.run([sys.executable, str(source), "pack", str(out)], cwd=str(Path(source).resolve().parent),
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.exists():
        raise RecordError(f"packing {source} failed (exit {proc.returncode}):\n"
                          f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return out.read_bytes()


def code_checks(summaries, shipped, source_bytes):
    """List of code-provenance problems (empty when the shipped code is exactly what was counted and run)."""
    problems = []
    counted = sorted({s["bytes_code"] for s in summaries})
    if counted != [len(shipped)]:
        problems.append(f"the packed train_gpt.py is {len(shipped):,} bytes but the runs counted bytes_code="
                        f"{', '.join(f'{c:,}' for c in counted)}: the code changed since the runs (rerun them, or "
                        f"ship the file that ran with --packed)")
    known = {sha256_bytes(shipped): "the shipped packed file"}
    if source_bytes is not None:
        known.setdefault(sha256_bytes(source_bytes), "the source it was packed from")
    for s in summaries:
        shas = logged_source_shas(s)
        if not shas:
            problems.append(f"{ms.log_path(s)}: no 'source: ... sha256:' line, cannot tell which code ran")
        elif len(shas) > 1 or shas[0] not in known:
            problems.append(f"{ms.log_path(s)}: the run's code sha256 {', '.join(x[:16] for x in shas)} is neither "
                            f"the shipped file's nor its source's ({', '.join(k[:16] for k in known)})")
    return problems


def env_value(value):
    """A config value as the env string train_gpt.py parses back to it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return "" if value is None else str(value)


def preset_defaults(tg, preset):
    """The resolved config of `PRESET=preset` with no other env, using the trainer's own loader."""
    try:
        return dataclasses.asdict(tg.load_config({"PRESET": preset, "RUN_ID": "defaults"}))
    except tg.ConfigError as e:
        raise RecordError(f"the shipped train_gpt.py does not know PRESET={preset}: {e}") from None


def config_overrides(config, defaults):
    """{ENV_NAME: value string} of every config value that differs from the preset's defaults (sorted)."""
    out = {}
    for key in sorted(config):
        if key in COMMAND_SKIP_KEYS:
            continue
        if key not in defaults:
            raise RecordError(f"config key {key!r} of the runs is unknown to the shipped train_gpt.py")
        if config[key] != defaults[key]:
            out[key.upper()] = env_value(config[key])
    return out


def per_seed_differences(summaries):
    """Config keys (outside the seed and bookkeeping) whose values differ between the seeds: {key: [values]}."""
    configs = [s["config"] for s in summaries]
    keys = sorted(set().union(*configs) - COMMAND_SKIP_KEYS)
    return {k: [c.get(k) for c in configs] for k in keys if len({repr(c.get(k)) for c in configs}) > 1}


def run_command(summaries, overrides):
    """Shell loop that reruns every seed with the reconstructed env (python3, or torchrun for several ranks)."""
    preset = summaries[0]["preset"]
    seeds = " ".join(str(s["seed"]) for s in summaries)
    world = summaries[0].get("world_size") or 1
    launcher = "python3 train_gpt.py" if world == 1 else f"torchrun --standalone --nproc_per_node={world} train_gpt.py"
    env = " ".join([f"PRESET={preset}"] + [f"{k}={shlex.quote(v)}" for k, v in overrides.items()])
    text = f"for SEED in {seeds}; do\n  SEED=$SEED {env} \\\n    {launcher}\ndone"
    for key, values in per_seed_differences(summaries).items():
        text += f"\n# note: {key.upper()} differed between the seeds: {values} (the first seed's value is shown)"
    return text


def cell_bpb(summary, stage):
    """A stage's val_bpb to 8 decimals (as the log prints it), or an em dash when the stage did not run."""
    v = ablate.stage_bpb(summary, stage)
    return "—" if v is None else f"{v:.8f}"


def mean_cell(values, fmt):
    """'mean ± std' of the values with `fmt` (a format spec), '—' when empty, no ± for a single value."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    m, sd = ms.mean(values), ms.sample_std(values)
    return format(m, fmt) + ("" if sd is None else " ± " + format(sd, fmt))


def results_table(summaries):
    """Markdown per-seed table (steps, train time, every stage's val_bpb, bytes) plus a mean ± std row."""
    rows = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---:|" * len(TABLE_HEADER)]
    for s in summaries:
        cells = [str(s["seed"]), str(s["steps"]), f"{s['train_time_ms']:.1f}"]
        cells += [cell_bpb(s, st) for st in ms.TABLE_STAGES]
        cells += [f"{s['bytes_total']:,}", f"{s['bytes_code']:,}"]
        rows.append("| " + " | ".join(cells) + " |")
    cells = ["**Mean ± std**", mean_cell([s["steps"] for s in summaries], ".1f"),
             mean_cell([s["train_time_ms"] for s in summaries], ".1f")]
    cells += [mean_cell([ablate.stage_bpb(s, st) for s in summaries], ".8f") for st in ms.TABLE_STAGES]
    cells += [mean_cell([s["bytes_total"] for s in summaries], ",.1f"),
              mean_cell([s["bytes_code"] for s in summaries], ",.1f")]
    rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def submission_args(names, args):
    """make_submission.py arguments that (re)build this folder's submission.json from the copied summaries."""
    out = list(names) + ["--author", args.author, "--github-id", args.github_id, "--name", args.name,
                         "--blurb", args.blurb, "--deterministic"]
    for flag, value in (("--metric", args.metric), ("--hardware", args.hardware), ("--date", args.date)):
        if value is not None:
            out += [flag, value]
    if args.allow_nonrecord:
        out.append("--allow-nonrecord")
    if args.baseline_bpb is not None:
        out += ["--baseline-bpb", repr(args.baseline_bpb), "--baseline-std", repr(args.baseline_std),
                "--baseline-n", str(args.baseline_n)]
    return out + ["--out", "submission.json"]


def render_readme(summaries, sub, command, problems, sub_args, files):
    """README.md text of the record folder (every number read from the summaries or submission)."""
    std = sub.get("val_bpb_std")
    lines = [f"# {sub['name']}", "", sub["blurb"], "",
             f"- Author: {sub['author']} (@{sub['github_id']})", f"- Date: {sub['date']}",
             f"- Track: {sub['track']}" + (f" (non-record: {'; '.join(sub['non_record_reasons'])})"
                                           if sub.get("non_record_reasons") else ""),
             f"- Hardware: {sub['hardware']}", f"- Preset: {sub['preset']}; PyTorch {sub['pytorch_version']}",
             f"- Result: **{sub['metric']} val_bpb {sub['val_bpb']:.8f}"
             + (f" ± {std:.8f}" if std is not None else "") + f"** (mean ± sample std, n={len(summaries)} seeds)",
             "", "## Results", "", results_table(summaries), ""]
    comp = sub["compliance"]
    failed = [k for k, v in comp.items() if not v]
    lines.append("Compliance (recomputed from the summaries): "
                 + ("all checks pass." if not failed else "FAILED: " + ", ".join(failed) + "."))
    if "significance" in sub:
        sig = sub["significance"]
        lines.append(f"Welch t-test vs baseline {sig['baseline_val_bpb']} ± {sig['baseline_val_bpb_std']} "
                     f"(n={sig['baseline_n']}): t={sig['t']:.4f}, dof={sig['dof']:.2f}, "
                     f"one-sided p={sig['p_value']:.3g}; "
                     f"delta {sig['delta_bpb']:+.6f} BPB ({sig['delta_nats']:+.6f} nats).")
    lines += ["", "## Run command", "",
              f"Reconstructed from the summaries: every config value that differs from `PRESET={sub['preset']}`'s "
              f"defaults in the shipped train_gpt.py.", "", "```bash", command, "```", "",
              "## Code provenance", ""]
    counted = sorted({s["bytes_code"] for s in summaries})
    lines.append(f"Code bytes counted by the runs: {', '.join(f'{c:,}' for c in counted)}; shipped train_gpt.py: "
                 f"{files['train_gpt.py']:,} bytes, sha256 {files['train_gpt.py.sha256']}.")
    if problems:
        lines += ["", "**Code mismatch, shipped anyway (--allow-code-mismatch):**"] + [f"- {p}" for p in problems]
    else:
        lines.append("The shipped file is the one counted, and each log's `source:` sha256 is that file or the "
                     "source it was packed from.")
    lines += ["", "## Files", ""]
    lines += [f"- `{name}`" for name in files["names"]]
    lines += ["", "## Regenerating submission.json", "",
              "Run in this folder, with REPO the repository root; the output is byte-identical:", "",
              "```bash", 'python3 "$REPO/tools/make_submission.py" ' + shlex.join(sub_args), "```", ""]
    return "\n".join(lines)


def parse_args(argv):
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logs", nargs="+", required=True, help="<RUN_ID>.summary.json files, one per seed "
                                                             "(the .txt log must sit beside each)")
    p.add_argument("--out", required=True, help="record folder to create")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--blurb", required=True)
    p.add_argument("--metric", choices=ms.STAGES)
    p.add_argument("--hardware", help="hardware string (default: described from the runs)")
    p.add_argument("--date", help="ISO date (default: the newest run's finished_utc)")
    p.add_argument("--allow-nonrecord", action="store_true")
    p.add_argument("--baseline-bpb", type=float)
    p.add_argument("--baseline-std", type=float)
    p.add_argument("--baseline-n", type=int)
    p.add_argument("--source", default=str(ROOT / "train_gpt.py"), help="train_gpt.py to pack (default: the repo's)")
    p.add_argument("--packed", help="ship this already-packed file instead of packing --source")
    p.add_argument("--allow-code-mismatch", action="store_true", help="ship even if the code is not what ran")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    given = [x is not None for x in (args.baseline_bpb, args.baseline_std, args.baseline_n)]
    if any(given) and not all(given):
        p.error("--baseline-bpb, --baseline-std and --baseline-n go together")
    return args


def build_record(args):
    """Validate, pack and write the record folder; returns (out path, problems shipped anyway)."""
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise RecordError(f"{out} exists and is not empty (pass --force to replace it)")
    summaries = sorted((ms.load_summary(p) for p in args.logs), key=lambda s: s["seed"])
    names = {}
    for s in summaries:
        for path in (Path(s["_path"]), ms.log_path(s), ms.meta_path(s)):
            if path.name in names and names[path.name] != path:
                raise RecordError(f"{path} and {names[path.name]} would have the same name in the record folder")
            names[path.name] = path
        logged_source_shas(s)  # the .txt log must exist
    baseline = None if args.baseline_bpb is None else (args.baseline_bpb, args.baseline_std, args.baseline_n)
    sub = ms.build_submission(summaries, author=args.author, github_id=args.github_id, name=args.name,
                              blurb=args.blurb, metric=args.metric, hardware=args.hardware,
                              allow_nonrecord=args.allow_nonrecord, baseline=baseline, date=args.date,
                              deterministic=True)
    source = Path(args.source)
    requirements = source.resolve().parent / "requirements.txt"
    if not requirements.exists():
        raise RecordError(f"{requirements} not found (the record ships the trainer's requirements.txt)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=str(out.parent)))
    try:
        if args.packed:
            shipped = Path(args.packed).read_bytes()
            (staging / "train_gpt.py").write_bytes(shipped)
        else:
            shipped = pack_code(source, staging, *pack_settings(summaries))
        source_bytes = source.read_bytes() if source.exists() else None
        problems = code_checks(summaries, shipped, source_bytes)
        if problems and not args.allow_code_mismatch:
            raise RecordError("the shipped code is not the code that ran:\n  - " + "\n  - ".join(problems)
                              + "\n(pass --allow-code-mismatch to ship it anyway; the README will say so)")
        tg = ablate.import_script(staging / "train_gpt.py")
        overrides = config_overrides(ms._need(summaries[0], "config"), preset_defaults(tg, summaries[0]["preset"]))
        for name, path in names.items():
            if path.exists():
                shutil.copy2(path, staging / name)
        shutil.copy2(requirements, staging / "requirements.txt")
        sub_names = [Path(s["_path"]).name for s in summaries]
        sub_args = submission_args(sub_names, args)
        (staging / "submission.json").write_text(ms.submission_json(sub), encoding="utf-8")
        listing = sorted(p.name for p in staging.iterdir()) + ["README.md"]
        files = {"names": sorted(listing), "train_gpt.py": len(shipped), "train_gpt.py.sha256": sha256_bytes(shipped)}
        readme = render_readme(summaries, sub, run_command(summaries, overrides), problems, sub_args, files)
        (staging / "README.md").write_text(readme, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out, problems


def main(argv=None):
    """Entry point: 0 on success, 2 when the inputs are refused."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out, problems = build_record(args)
    except (RecordError, ms.SubmissionError, ablate.AblationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"warning (shipped anyway): {p}", file=sys.stderr)
    print(f"wrote record folder {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
