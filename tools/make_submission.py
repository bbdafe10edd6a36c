#!/usr/bin/env python3
"""Build a record's submission.json from the logs/<RUN_ID>.summary.json files that train_gpt.py writes.

Every number in the output is read from (or computed from) the summaries, never typed in by hand:
per-seed results, the mean / sample std of the chosen eval stage, byte counts, and compliance booleans.
Optionally adds a one-sided Welch t-test against a baseline mean/std/n (e.g. the current SOTA), and prints
a markdown per-seed results table for the record README.

    python3 tools/make_submission.py logs/s1.summary.json logs/s2.summary.json logs/s3.summary.json \
        --author NAME --github-id ID --name "..." --blurb "..." \
        [--metric quantized_ttt] [--baseline-bpb 1.0810 --baseline-std 0.0002 --baseline-n 3] [--out submission.json]

The hardware string is read from the runs (device and world size of the summaries; GPU model from the
nvidia-smi table in the .txt log or the runner's <RUN_ID>.meta.json; CPU core count from the summary's
hardware record or that meta file), never assumed; --hardware overrides it. A run that is not the record
preset on 8 CUDA devices goes to the non-record track (pass --allow-nonrecord) and `non_record_reasons` says why. --deterministic takes the date
from the runs (newest finished_utc recorded in a summary or meta file) instead of today, so the same logs
always give a byte-identical submission.json.
"""
import argparse
import datetime
import json
import math
import re
import statistics
import sys
from pathlib import Path

STAGES = ("quantized", "quantized_sliding_window", "quantized_ttt")  # increasing preference for the default
TABLE_STAGES = ("pre_quantization_post_ema", "quantized", "quantized_sliding_window", "quantized_ttt")
# Config keys that legitimately differ between the seeds of one submission (seed itself, ids and paths).
PER_RUN_CONFIG_KEYS = frozenset({"seed", "run_id", "log_dir", "data_dir", "train_files", "val_files",
                                 "tokenizer_path", "artifact_path", "eval_only", "float_checkpoint", "export_from"})
TRAIN_LIMIT_MS = 600_000
EVAL_LIMIT_S = 600.0
SIZE_LIMIT_BYTES = 16_000_000
RECORD_MIN_SEEDS = 3
# Challenge rule: a record must beat SOTA by >= 0.005 nats/token at p < 0.01; for sp8192 that is ~0.00194 BPB.
THRESHOLD_NATS = 0.005
THRESHOLD_BPB_SP8192 = 0.00194
BPB_PER_NAT_SP8192 = 0.38713
P_VALUE_LIMIT = 0.01
RECORD_HARDWARE = "8xH100 80GB SXM"  # what the 10-minute track requires; never assumed, only compared
DEFAULT_HARDWARE = RECORD_HARDWARE  # kept for callers of hardware_warnings()
RECORD_WORLD_SIZE = 8
TRACK_RECORD = "10min_16mb"
TRACK_NON_RECORD = "non_record_16mb"


class SubmissionError(Exception):
    """A summary set that cannot become a valid submission; the message names the offending file."""


# ---------------------------------------------------------------------------------------------------------
# Student-t tail probability (scipy when present, otherwise an incomplete-beta continued fraction)
# ---------------------------------------------------------------------------------------------------------


def _betacf(a, b, x, max_iter=10_000, eps=1e-15):
    """Continued fraction for the regularized incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a, b, x):
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} outside [0, 1]")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_sf_builtin(t, dof):
    """P(T > t) for Student's t with (possibly fractional) dof, via the regularized incomplete beta."""
    if dof <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {dof}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def student_t_sf(t, dof):
    """P(T > t): scipy.stats.t.sf when scipy is importable, else the built-in; returns (p, method)."""
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return student_t_sf_builtin(t, dof), "builtin_incomplete_beta"
    return float(student_t.sf(t, dof)), "scipy.stats.t.sf"


def welch_statistic(mean, std, n, base_mean, base_std, base_n):
    """Welch's t of (mean - base_mean) and its Welch-Satterthwaite degrees of freedom; returns (t, dof)."""
    if n < 2 or base_n < 2:
        raise SubmissionError(f"Welch t-test needs >= 2 runs on each side (ours n={n}, baseline n={base_n})")
    if std < 0 or base_std < 0:
        raise SubmissionError("standard deviations must be non-negative")
    v1, v2 = std * std / n, base_std * base_std / base_n
    if v1 + v2 == 0.0:
        raise SubmissionError("Welch t-test undefined: both standard deviations are zero")
    t = (mean - base_mean) / math.sqrt(v1 + v2)
    dof = (v1 + v2) ** 2 / (v1 * v1 / (n - 1) + v2 * v2 / (base_n - 1))
    return t, dof


def welch_one_sided(mean, std, n, base_mean, base_std, base_n):
    """One-sided Welch t-test of H1: mean < base_mean; returns dict(t, dof, p_value, p_method)."""
    t, dof = welch_statistic(mean, std, n, base_mean, base_std, base_n)
    p, method = student_t_sf(-t, dof)  # P(T <= t) = P(T > -t)
    return {"t": t, "dof": dof, "p_value": p, "p_method": method}


# ---------------------------------------------------------------------------------------------------------
# Reading and validating summaries
# ---------------------------------------------------------------------------------------------------------


def load_summary(path):
    """Read one summary JSON file; returns the dict with its source path under '_path'."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SubmissionError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise SubmissionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SubmissionError(f"{path}: expected a JSON object")
    data["_path"] = str(path)
    return data


def log_path(summary):
    """Path of the run's text log: <RUN_ID>.txt beside the summary (train_gpt.py writes both to LOG_DIR)."""
    path = Path(summary["_path"])
    stem = path.name[:-len(".summary.json")] if path.name.endswith(".summary.json") else path.stem
    return path.with_name(stem + ".txt")


def meta_path(summary):
    """Path of the runner's sidecar <RUN_ID>.meta.json beside the summary (written by tools/ablate.py)."""
    log = log_path(summary)
    return log.with_name(log.name[:-len(".txt")] + ".meta.json")


def load_meta(summary):
    """The runner's meta dict for one summary ({} when the run was not launched by tools/ablate.py)."""
    path = meta_path(summary)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SubmissionError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


NVIDIA_SMI_GPU = re.compile(r"^\|\s+\d+\s+(NVIDIA .+?|Tesla .+?)\s+(?:On|Off)\s+\|", re.M)


def gpu_names(summary):
    """GPU model names recorded for a run: the meta file's nvidia-smi query, else the log's nvidia-smi table."""
    names = load_meta(summary).get("gpus") or []
    if not names and log_path(summary).exists():
        names = NVIDIA_SMI_GPU.findall(log_path(summary).read_text(encoding="utf-8", errors="replace"))
    return [str(n).strip() for n in names]


def describe_hardware(summaries):
    """Plain hardware string from what the runs recorded (device, world size, CPU count, GPU model)."""
    devices = {str(s.get("device", "")).split(":")[0] for s in summaries}
    sizes = sorted({s.get("world_size") for s in summaries})
    if len(devices) != 1 or len(sizes) != 1:
        raise SubmissionError(f"runs mix devices {sorted(devices)} / world sizes {sizes}; one submission is one setup")
    device, size = devices.pop(), sizes[0]
    procs = f"{size} process{'es' if size != 1 else ''}"
    if device == "cpu":
        cpus = sorted({(s.get("hardware") or {}).get("cpus_available") or load_meta(s).get("cpus_available")
                       for s in summaries} - {None})
        cores = f"{cpus[0]} cores" if len(cpus) == 1 else "core count not recorded"
        return f"CPU ({cores}), {procs}"
    if device == "cuda":
        names = sorted({n for s in summaries for n in gpu_names(s)})
        if len(names) == 1:
            return f"{size}x{names[0]}"
        return f"{size}x CUDA GPU (model not recorded in the summaries or logs)"
    return f"{device or 'unknown device'}, {procs}"


def non_record_reasons(summaries):
    """Why these runs cannot be a 10-minute-track record (empty list when preset and hardware qualify)."""
    reasons = []
    presets = sorted({str(s.get("preset")) for s in summaries})
    if presets != ["record"]:
        reasons.append(f"preset {', '.join(presets)} is not 'record'")
    devices = sorted({str(s.get("device")) for s in summaries})
    if any(not d.startswith("cuda") for d in devices):
        reasons.append(f"device {', '.join(devices)}, not CUDA")
    sizes = sorted({s.get("world_size") for s in summaries}, key=str)
    if sizes != [RECORD_WORLD_SIZE]:
        reasons.append(f"world size {', '.join(map(str, sizes))}, not {RECORD_WORLD_SIZE}")
    return reasons


def run_date(summaries):
    """ISO date (UTC) of the newest run, from a 'finished_utc' in a summary or its meta file; None if none."""
    stamps = []
    for s in summaries:
        for source in (s, load_meta(s)):
            stamp = source.get("finished_utc") or source.get("started_utc")
            if stamp:
                stamps.append(str(stamp))
    return max(stamps)[:10] if stamps else None


def _need(summary, *keys):
    """Fetch a nested key from a summary or raise a SubmissionError naming the file and the key."""
    node = summary
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node or node[key] is None:
            dotted = ".".join(keys[:i + 1])
            raise SubmissionError(f"{summary['_path']}: missing '{dotted}' (incomplete or crashed run?)")
        node = node[key]
    return node


def choose_metric(summaries, metric=None):
    """The eval stage to report: `metric` if given, else the most-preferred stage present in any summary."""
    if metric is not None:
        return metric
    present = {k for s in summaries for k in (s.get("results") or {})}
    for stage in reversed(STAGES):
        if stage in present:
            return stage
    raise SubmissionError(f"{summaries[0]['_path']}: no quantized results ({', '.join(STAGES)}) in any summary")


def comparable_config(summary):
    """The config of one summary minus the keys allowed to differ between seeds."""
    cfg = _need(summary, "config")
    return {k: v for k, v in cfg.items() if k not in PER_RUN_CONFIG_KEYS}


def validate(summaries, metric, allow_nonrecord=False):
    """Raise SubmissionError on mixed configs, repeated seeds, missing fields/stage or a non-record preset."""
    if not summaries:
        raise SubmissionError("no summary files given")
    ref = summaries[0]
    ref_cfg = comparable_config(ref)
    seen = {}
    for s in summaries:
        path = s["_path"]
        for key in ("seed", "preset", "pytorch_version", "steps", "train_time_ms", "hessian_seconds",
                    "bytes_total", "bytes_code"):
            _need(s, key)
        _need(s, "eval_seconds", "total_from_artifact_load")
        if metric not in (s.get("results") or {}):
            have = ", ".join(sorted(s.get("results") or {})) or "none"
            raise SubmissionError(f"{path}: no results for stage '{metric}' (has: {have})")
        for key in ("val_loss", "val_bpb"):
            _need(s, "results", metric, key)
        if s["preset"] != "record" and not allow_nonrecord:
            raise SubmissionError(f"{path}: preset is '{s['preset']}', not 'record' "
                                  f"(pass --allow-nonrecord for the non-record track)")
        reasons = non_record_reasons([s])
        if reasons and not allow_nonrecord:
            raise SubmissionError(f"{path}: not a record run ({'; '.join(reasons)}); "
                                  f"pass --allow-nonrecord for the non-record track")
        if s["seed"] in seen:
            raise SubmissionError(f"{path}: seed {s['seed']} repeats (already in {seen[s['seed']]})")
        seen[s["seed"]] = path
        if s is ref:
            continue
        cfg = comparable_config(s)
        diff = sorted(k for k in set(cfg) | set(ref_cfg) if cfg.get(k, "<absent>") != ref_cfg.get(k, "<absent>"))
        if diff:
            shown = "; ".join(f"{k}={cfg.get(k, '<absent>')!r} vs {ref_cfg.get(k, '<absent>')!r}" for k in diff[:8])
            raise SubmissionError(f"{path}: config differs from {ref['_path']} in {len(diff)} key(s): {shown} "
                                  f"(mixed-config seeds are rejected)")
        for key in ("data_seed", "world_size", "pytorch_version", "bytes_code"):
            if s.get(key) != ref.get(key):
                raise SubmissionError(f"{path}: {key}={s.get(key)!r} differs from {ref['_path']} "
                                      f"({ref.get(key)!r}); all seeds must come from the same code and setup")


# ---------------------------------------------------------------------------------------------------------
# Building the submission
# ---------------------------------------------------------------------------------------------------------


def mean(values):
    """Arithmetic mean (math.fsum based, so independent of summation order up to rounding of the result)."""
    values = list(values)
    return math.fsum(values) / len(values)


def sample_std(values):
    """Sample standard deviation (n - 1 denominator); None for a single value."""
    values = list(values)
    return statistics.stdev(values) if len(values) >= 2 else None


def seed_result(summary, metric):
    """Per-seed record entry, copied from one summary."""
    res = summary["results"][metric]
    out = {"val_loss": res["val_loss"], "val_bpb": res["val_bpb"], "artifact_bytes": summary["bytes_total"],
           "bytes_model": summary.get("bytes_model"), "steps": summary["steps"],
           "train_time_ms": summary["train_time_ms"], "hessian_seconds": summary["hessian_seconds"],
           "eval_seconds": summary["eval_seconds"]["total_from_artifact_load"],
           "eval_seconds_by_stage": dict(summary["eval_seconds"]), "run_id": summary.get("run_id"),
           "scored_positions": (summary.get("legality") or {}).get("positions")}
    return {k: v for k, v in out.items() if v is not None}


def _legal(summary, key):
    """A legality flag of one summary; False when the run recorded no legality ledger (nothing to prove it)."""
    return (summary.get("legality") or {}).get(key) is True


def compliance(summaries):
    """Compliance booleans recomputed from every summary (all seeds must pass each check)."""
    return {
        "train_under_600s": all(s["train_time_ms"] + 1000.0 * s["hessian_seconds"] <= TRAIN_LIMIT_MS
                                for s in summaries),
        "artifact_under_16mb": all(s["bytes_total"] <= SIZE_LIMIT_BYTES for s in summaries),
        "eval_under_600s": all(s["eval_seconds"]["total_from_artifact_load"] <= EVAL_LIMIT_S for s in summaries),
        "score_first_ttt": all((s.get("compliance") or {}).get("score_first_ttt") is True
                               and _legal(s, "score_before_update") for s in summaries),
        "scored_exactly_once": all(_legal(s, "scored_exactly_once") for s in summaries),
        "score_before_update": all(_legal(s, "score_before_update") for s in summaries),
        "three_seeds": len({s["seed"] for s in summaries}) >= RECORD_MIN_SEEDS,
    }


def significance(summaries, metric, val_bpb, val_bpb_std, base_bpb, base_std, base_n):
    """Welch test vs the baseline plus the BPB delta against the record margin (the challenge's rule)."""
    n = len(summaries)
    if val_bpb_std is None:
        raise SubmissionError("a t-test needs at least 2 seeds")
    test = welch_one_sided(val_bpb, val_bpb_std, n, base_bpb, base_std, base_n)
    delta_bpb = base_bpb - val_bpb  # positive = we are better
    # val_loss / val_bpb = ln2 * bytes/token on this val set, so the nats delta is exact, not the §1.4 estimate.
    nats_per_bpb = mean(s["results"][metric]["val_loss"] / s["results"][metric]["val_bpb"] for s in summaries)
    return {"baseline_val_bpb": base_bpb, "baseline_val_bpb_std": base_std, "baseline_n": base_n,
            "val_bpb": val_bpb, "val_bpb_std": val_bpb_std, "n": n, **test,
            "alternative": "mean val_bpb < baseline mean (one-sided Welch)",
            "delta_bpb": delta_bpb, "delta_nats": delta_bpb * nats_per_bpb,
            "delta_nats_sp8192_estimate": delta_bpb / BPB_PER_NAT_SP8192,
            "threshold_nats": THRESHOLD_NATS, "threshold_bpb_sp8192": THRESHOLD_BPB_SP8192,
            "meets_threshold": delta_bpb >= THRESHOLD_BPB_SP8192,
            "significant_at_0_01": test["p_value"] < P_VALUE_LIMIT}


def submission_date(summaries, date=None, deterministic=False):
    """The submission date: `date` if given, else the runs' date when deterministic, else today."""
    if date:
        return date
    if deterministic:
        found = run_date(summaries)
        if found is None:
            raise SubmissionError(f"{summaries[0]['_path']}: --deterministic needs a run date, but no summary or "
                                  f"<RUN_ID>.meta.json records 'finished_utc' (launch runs with tools/ablate.py, or "
                                  f"pass --date YYYY-MM-DD)")
        return found
    return datetime.date.today().isoformat()


def build_submission(summaries, *, author, github_id, name, blurb, metric=None, hardware=None,
                     allow_nonrecord=False, baseline=None, date=None, deterministic=False):
    """Validate the summaries and return the submission dict; `baseline` is (bpb, std, n) or None.

    hardware=None describes the hardware from the runs (describe_hardware); deterministic=True takes the
    date from the runs instead of today."""
    metric = choose_metric(summaries, metric)
    validate(summaries, metric, allow_nonrecord)
    summaries = sorted(summaries, key=lambda s: s["seed"])
    bpbs = [s["results"][metric]["val_bpb"] for s in summaries]
    losses = [s["results"][metric]["val_loss"] for s in summaries]
    reasons = non_record_reasons(summaries)
    sub = {
        "author": author, "github_id": github_id, "name": name, "blurb": blurb,
        "date": submission_date(summaries, date, deterministic),
        "track": TRACK_NON_RECORD if reasons else TRACK_RECORD,
        "non_record_reasons": reasons or None,
        "preset": summaries[0]["preset"],
        "metric": metric,
        "val_loss": mean(losses), "val_bpb": mean(bpbs), "val_bpb_std": sample_std(bpbs),
        "val_loss_std": sample_std(losses),
        "seeds": [s["seed"] for s in summaries],
        "seed_results": {str(s["seed"]): seed_result(s, metric) for s in summaries},
        "hardware": hardware or describe_hardware(summaries),
        "device": summaries[0].get("device"),
        "pytorch_version": summaries[0]["pytorch_version"],
        "world_size": summaries[0].get("world_size"),
        "model_params": summaries[0].get("model_params"),
        "bytes_total": max(s["bytes_total"] for s in summaries),
        "bytes_code": summaries[0]["bytes_code"],
        "compliance": compliance(summaries),
    }
    if baseline is not None:
        sub["significance"] = significance(summaries, metric, sub["val_bpb"], sub["val_bpb_std"], *baseline)
    return {k: v for k, v in sub.items() if v is not None or k in ("val_bpb_std",)}


def hardware_warnings(summaries, hardware):
    """Warnings when the summaries' world_size/device do not look like the claimed hardware string."""
    warnings = []
    head = hardware.lower().split("x", 1)[0].strip()
    sizes = sorted({s.get("world_size") for s in summaries if s.get("world_size") is not None})
    if head.isdigit() and sizes and sizes != [int(head)]:
        warnings.append(f"summaries ran with world_size {sizes} but --hardware says {hardware!r}")
    devices = sorted({str(s.get("device")) for s in summaries if s.get("device")})
    if "h100" in hardware.lower() and any(not d.startswith("cuda") for d in devices):
        warnings.append(f"summaries ran on device {devices} but --hardware says {hardware!r}")
    return warnings


def _fmt_bpb(summary, stage):
    """One table cell: a stage's val_bpb to 8 decimals, or an em dash when the stage did not run."""
    res = (summary.get("results") or {}).get(stage)
    return f"{res['val_bpb']:.8f}" if res and "val_bpb" in res else "—"


def markdown_table(summaries, submission):
    """Markdown per-seed results table (plus a mean row for the reported stage) for the record README."""
    rows = ["| Seed | Steps | Pre-quant BPB | Quantized BPB | Sliding BPB | TTT BPB | Artifact bytes |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sorted(summaries, key=lambda s: s["seed"]):
        cells = [str(s["seed"]), str(s["steps"])] + [_fmt_bpb(s, st) for st in TABLE_STAGES]
        rows.append("| " + " | ".join(cells + [f"{s['bytes_total']:,}"]) + " |")
    std = submission["val_bpb_std"]
    std_txt = f" ± {std:.8f}" if std is not None else ""
    rows.append(f"\n**Mean {submission['metric']} val_bpb: {submission['val_bpb']:.8f}{std_txt}** "
                f"(n={len(summaries)}; max artifact {submission['bytes_total']:,} bytes)")
    return "\n".join(rows)


def submission_json(sub):
    """The exact text written to submission.json (2-space JSON, insertion order, trailing newline)."""
    return json.dumps(sub, indent=2) + "\n"


def parse_args(argv):
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], fromfile_prefix_chars="@",
                                epilog="@FILE reads arguments from FILE, one per line (e.g. logs/minigolf/submission.args)")
    p.add_argument("summaries", nargs="+", help="logs/<RUN_ID>.summary.json, one per seed")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--blurb", required=True)
    p.add_argument("--metric", choices=STAGES, default=None,
                   help="eval stage to report (default: last available of quantized_ttt > sliding > quantized)")
    p.add_argument("--hardware", default=None,
                   help="hardware string (default: described from the runs' device, world size, GPU/CPU records)")
    p.add_argument("--allow-nonrecord", action="store_true",
                   help="accept runs that are not the record preset on 8 CUDA devices (non_record_16mb track)")
    p.add_argument("--baseline-bpb", type=float)
    p.add_argument("--baseline-std", type=float)
    p.add_argument("--baseline-n", type=int)
    p.add_argument("--date", default=None, help="ISO date (default: today, or the runs' date with --deterministic)")
    p.add_argument("--deterministic", action="store_true",
                   help="date from the newest run (finished_utc in a summary or meta file), never today: the same "
                        "logs always give a byte-identical file")
    p.add_argument("--out", default="submission.json")
    args = p.parse_args(argv)
    given = [x is not None for x in (args.baseline_bpb, args.baseline_std, args.baseline_n)]
    if any(given) and not all(given):
        p.error("--baseline-bpb, --baseline-std and --baseline-n go together")
    return args


def main(argv=None):
    """Entry point: write submission.json and print the README table; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    baseline = None if args.baseline_bpb is None else (args.baseline_bpb, args.baseline_std, args.baseline_n)
    try:
        summaries = [load_summary(p) for p in args.summaries]
        sub = build_submission(summaries, author=args.author, github_id=args.github_id, name=args.name,
                               blurb=args.blurb, metric=args.metric, hardware=args.hardware,
                               allow_nonrecord=args.allow_nonrecord, baseline=baseline, date=args.date,
                               deterministic=args.deterministic)
    except SubmissionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.hardware:
        for w in hardware_warnings(summaries, args.hardware):
            print(f"warning: {w}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(submission_json(sub), encoding="utf-8")
    print(markdown_table(summaries, sub))
    print()
    failed = [k for k, v in sub["compliance"].items() if not v]
    print(f"compliance: {'all checks pass' if not failed else 'FAILED ' + ', '.join(failed)}")
    if "significance" in sub:
        sig = sub["significance"]
        print(f"welch: t={sig['t']:.4f} dof={sig['dof']:.2f} one-sided p={sig['p_value']:.3g} ({sig['p_method']}); "
              f"delta={sig['delta_bpb']:+.6f} BPB ({sig['delta_nats']:+.6f} nats) vs threshold "
              f"{THRESHOLD_BPB_SP8192} BPB: {'meets' if sig['meets_threshold'] else 'does NOT meet'}; "
              f"p<{P_VALUE_LIMIT}: {sig['significant_at_0_01']}")
    print(f"wrote {out} ({sub['track']}, {sub['metric']} val_bpb {sub['val_bpb']:.8f}, seeds {sub['seeds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
