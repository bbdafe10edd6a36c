#!/usr/bin/env python3
"""Ablation runner: train_gpt.py for every variant x seed, then a results table with Welch t-tests and curves.

    python3 tools/ablate.py --name smear --base "PRESET=minigolf" \
        --variant "smear=SMEAR_GATE=1" --variant "lr=MATRIX_LR=0.03,EMBED_LR=0.05" --seeds 1,2 \
        [--iterations N | --train-tokens T] [--nproc 8] [--env K=V ...] [--out-dir bench/results/smear]

Plan.  The base is a variant named `base` with no overrides of its own. Every run gets the env
  base (--base, then --env) < budget (--iterations / --train-tokens) < the variant's overrides
plus SEED, RUN_ID=<name>_<variant>_s<seed>, LOG_DIR=<out>/runs and ARTIFACT_PATH=<out>/runs/<RUN_ID>.int6.ptz,
and is launched sequentially with `python3 train_gpt.py` (or `torchrun --standalone --nproc_per_node=N`).
Inherited env vars that name a config field are dropped, so only the plan configures the runs.
`--iterations N` is a step budget (ITERATIONS=N, MAX_WALLCLOCK_SECONDS=0: reproducible on CPU);
`--train-tokens T` sets ITERATIONS=ceil(T / TRAIN_BATCH_TOKENS) per run (with MAX_WALLCLOCK_SECONDS=0).
A plan can live in a file of arguments, one per line (`# comments` allowed): `python3 tools/ablate.py @plan.args`.
`{seed}` in any env value is replaced by the run's seed (e.g. EXPORT_FROM=<dir>/base_s{seed}.float.pt).

Resuming.  A run whose summary exists is never rerun. A run is failed when its summary has a `status`
(diverged, export_failed), has no final evaluation, or the process exited non-zero (<RUN_ID>.meta.json records
the exit code); failed runs are listed in the table, never averaged, and NOT retried (the same seed usually
fails the same way) unless --retry-failed. A run interrupted before it finished (meta without an exit code)
is rerun. Files of a rerun run are moved to <out>/runs/attempts/ first, never overwritten.

Honesty checks (before anything is launched and again before tabulating): every summary must match the
plan's env for its run, every run must share the base run's data fingerprint (tokenizer sha256, vocab, val
tokens, train shards, byte sidecar), setup (world size, device, torch) and every config value the variant
does not set; otherwise the run is refused with an error naming it and the differing key. A variant named
with --data-variant changes the tokens on purpose (another tokenizer, e.g. CaseOps): its fingerprint may
differ, but it must score the same validation text, so every one of its runs must imply the base's
validation byte count (scored tokens x loss / (ln 2 x bpb), the BPB denominator) to within half a byte, or
within --val-bytes-rtol when the validation set is cut to whole sequences at a different point (the table
then shows both byte counts).

Outputs in the out dir: results.md, results.json and curves.png (matplotlib optional).
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
ROOT = TOOLS_DIR.parent
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))
import make_submission as ms  # noqa: E402  (Student-t, mean, sample std)

STAGES = ms.TABLE_STAGES  # pre_quantization_post_ema, quantized, quantized_sliding_window, quantized_ttt
STAGE_LABELS = {"pre_quantization_post_ema": "Pre-quant", "quantized": "Quantized",
                "quantized_sliding_window": "Sliding", "quantized_ttt": "TTT"}
RUNNER_KEYS = ("SEED", "RUN_ID", "LOG_DIR", "ARTIFACT_PATH")  # set by the runner for every run
BUDGET_KEYS = ("ITERATIONS", "MAX_WALLCLOCK_SECONDS")
FINGERPRINT_KEYS = ("tokenizer_sha256", "vocab_size", "val_tokens", "train_shards", "bytes_sidecar")
SETUP_KEYS = ("world_size", "device", "pytorch_version")
PER_RUN_CONFIG_KEYS = ms.PER_RUN_CONFIG_KEYS  # ids, seeds and data paths (data identity is the fingerprint)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
LINE_STYLES = ("-", "--", ":", "-.")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class AblationError(Exception):
    """A plan or a set of runs that cannot be run or tabulated honestly; the message names the run and key."""


# ---------------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------------


def parse_assignments(text, what):
    """'K=V,K=V' -> {K: V} in order; AblationError on a malformed pair, a bad key or a repeated key."""
    out = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not KEY_RE.match(key):
            raise AblationError(f"{what}: {item!r} is not KEY=VALUE with an upper-case env var name")
        if key in out:
            raise AblationError(f"{what}: {key} is set twice")
        out[key] = value.strip()
    return out


def parse_variant(text):
    """'label=K=V,K=V' -> (label, {K: V}); the label 'base' is reserved for the base."""
    label, sep, rest = text.partition("=")
    label = label.strip()
    if not sep or not NAME_RE.match(label):
        raise AblationError(f"--variant {text!r}: expected LABEL=KEY=VALUE[,KEY=VALUE...] with LABEL made of "
                            f"letters, digits, '.', '_' or '-'")
    if label == "base":
        raise AblationError("--variant: the label 'base' is reserved (the base runs with --base/--env only)")
    return label, parse_assignments(rest, f"--variant {label}")


def parse_seeds(text):
    """'1,2,3' -> [1, 2, 3]; AblationError on a non-integer or a repeated seed."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AblationError(f"--seeds {text!r}: expected comma-separated integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise AblationError(f"--seeds {text!r}: give one or more distinct seeds")
    return seeds


def iterations_for_tokens(train_tokens, train_batch_tokens):
    """Steps that cover at least `train_tokens` tokens at `train_batch_tokens` per step (ceil division)."""
    if train_tokens <= 0 or train_batch_tokens <= 0:
        raise AblationError(f"--train-tokens {train_tokens} and TRAIN_BATCH_TOKENS {train_batch_tokens} must be > 0")
    return -(-train_tokens // train_batch_tokens)


class Run:
    """One variant x seed: its ids, the config env the plan gives it, and its files under <out>/runs."""

    def __init__(self, plan, variant, seed, env):
        """A run of `variant` with `seed` under `plan`, configured by `env` (plan env, runner keys excluded)."""
        self.variant, self.seed, self.env = variant, seed, env
        self.run_id = f"{plan.name}_{variant}_s{seed}"
        self.dir = plan.runs_dir
        self.summary_path = self.dir / f"{self.run_id}.summary.json"
        self.log_path = self.dir / f"{self.run_id}.txt"
        self.stdout_path = self.dir / f"{self.run_id}.stdout.txt"
        self.meta_path = self.dir / f"{self.run_id}.meta.json"
        self.artifact_path = self.dir / f"{self.run_id}.int6.ptz"

    def runner_env(self):
        """SEED, RUN_ID, LOG_DIR and ARTIFACT_PATH of this run."""
        return {"SEED": str(self.seed), "RUN_ID": self.run_id, "LOG_DIR": str(self.dir),
                "ARTIFACT_PATH": str(self.artifact_path)}

    def files(self):
        """Every file this run may have written (summary, log, stdout capture, meta, artifact)."""
        return [self.summary_path, self.log_path, self.stdout_path, self.meta_path, self.artifact_path]


class Plan:
    """The parsed command line: name, out dir, base/common/variant envs, seeds, budget and launcher."""

    def __init__(self, args):
        """Parse and check the argparse namespace; AblationError on an inconsistent plan."""
        self.name = args.name or (Path(args.out_dir).name if args.out_dir else None)
        if not self.name or not NAME_RE.match(self.name):
            raise AblationError(f"--name {self.name!r}: give a name made of letters, digits, '.', '_' or '-'")
        self.out_dir = Path(args.out_dir or Path("bench") / "results" / self.name)
        self.runs_dir = self.out_dir / "runs"  # as given (relative paths keep results.md machine-independent)
        self.script = Path(args.script)
        self.nproc = args.nproc
        self.seeds = parse_seeds(args.seeds)
        self.metric = args.metric
        self.base_env = parse_assignments(args.base or "", "--base")
        self.common_env = {}
        for item in args.env or []:
            for k, v in parse_assignments(item, "--env").items():
                if k in self.base_env or k in self.common_env:
                    raise AblationError(f"--env: {k} is set twice (in --base/--env)")
                self.common_env[k] = v
        self.iterations, self.train_tokens = args.iterations, args.train_tokens
        self.data_variants = set(args.data_variant or [])
        self.val_bytes_rtol = args.val_bytes_rtol
        if self.val_bytes_rtol and not self.data_variants:
            raise AblationError("--val-bytes-rtol only applies to --data-variant runs")
        self.variants = [("base", {})]
        for text in args.variant or []:
            label, env = parse_variant(text)
            if label in dict(self.variants):
                raise AblationError(f"--variant {label}: the label is used twice")
            self.variants.append((label, env))
        shared = dict(self.base_env, **self.common_env)
        for label, env in [("--base/--env", shared)] + self.variants[1:]:
            taken = sorted(set(env) & set(RUNNER_KEYS))
            if taken:
                raise AblationError(f"{label}: {', '.join(taken)} is set by the runner for every run")
        unknown = sorted(self.data_variants - {label for label, _ in self.variants[1:]})
        if unknown:
            raise AblationError(f"--data-variant {', '.join(unknown)}: not the label of a --variant")
        if (self.iterations is not None or self.train_tokens is not None) and set(shared) & set(BUDGET_KEYS):
            raise AblationError(f"--base/--env set {', '.join(sorted(set(shared) & set(BUDGET_KEYS)))} and a "
                                f"budget flag is given: set the budget once")
        if self.iterations is not None and self.iterations <= 0:
            raise AblationError(f"--iterations {self.iterations} must be positive")
        self.budget_note = self._budget_note()
        self.runs = None  # filled by resolve()

    def _budget_note(self):
        """One-line description of the training budget for the report."""
        if self.iterations is not None:
            return f"ITERATIONS={self.iterations} with MAX_WALLCLOCK_SECONDS=0 (step budget)"
        if self.train_tokens is not None:
            return (f"{self.train_tokens} train tokens: ITERATIONS=ceil(tokens / TRAIN_BATCH_TOKENS) per run, "
                    f"MAX_WALLCLOCK_SECONDS=0")
        return "as configured (the preset's ITERATIONS / MAX_WALLCLOCK_SECONDS unless set in --base/--env)"

    def resolve(self, batch_tokens_of):
        """Build the runs (variant-major, seed-minor); batch_tokens_of(env) gives TRAIN_BATCH_TOKENS if needed."""
        runs = []
        for label, variant_env in self.variants:
            env = dict(self.base_env, **self.common_env)
            if self.iterations is not None:
                env.update(ITERATIONS=str(self.iterations), MAX_WALLCLOCK_SECONDS="0")
            env.update(variant_env)
            if self.train_tokens is not None and "ITERATIONS" not in variant_env:
                try:
                    tbt = int(env["TRAIN_BATCH_TOKENS"]) if "TRAIN_BATCH_TOKENS" in env else batch_tokens_of(env)
                except ValueError:
                    raise AblationError(f"TRAIN_BATCH_TOKENS={env['TRAIN_BATCH_TOKENS']!r} is not an integer") from None
                env.update(ITERATIONS=str(iterations_for_tokens(self.train_tokens, tbt)))
                env.setdefault("MAX_WALLCLOCK_SECONDS", "0")
            for seed in self.seeds:  # "{seed}" in a value becomes the run's seed (e.g. EXPORT_FROM per seed)
                runs.append(Run(self, label, seed, {k: v.replace("{seed}", str(seed)) for k, v in env.items()}))
        self.runs = runs
        return runs

    def variant_env(self, label):
        """The overrides that define variant `label` ({} for base)."""
        return dict(self.variants)[label]

    def launcher(self):
        """The launch command (list) of one run: python3 script, or torchrun with --nproc_per_node."""
        if self.nproc:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.nproc}", str(self.script)]
        return [sys.executable, str(self.script)]

    def display_launcher(self):
        """The launch command as a person would type it."""
        if self.nproc:
            return f"torchrun --standalone --nproc_per_node={self.nproc} {shlex.quote(str(self.script))}"
        return f"python3 {shlex.quote(str(self.script))}"

    def canonical_command(self):
        """The ablate.py invocation that reproduces this plan (independent of argument order and @files)."""
        parts = ["python3", "tools/ablate.py", "--name", self.name, "--out-dir", str(self.out_dir)]
        if self.base_env:
            parts += ["--base", ",".join(f"{k}={v}" for k, v in self.base_env.items())]
        for k, v in self.common_env.items():
            parts += ["--env", f"{k}={v}"]
        for label, env in self.variants[1:]:
            parts += ["--variant", f"{label}=" + ",".join(f"{k}={v}" for k, v in env.items())]
        parts += ["--seeds", ",".join(map(str, self.seeds))]
        if self.iterations is not None:
            parts += ["--iterations", str(self.iterations)]
        if self.train_tokens is not None:
            parts += ["--train-tokens", str(self.train_tokens)]
        if self.nproc:
            parts += ["--nproc", str(self.nproc)]
        if str(self.script) != "train_gpt.py":
            parts += ["--script", str(self.script)]
        if self.metric:
            parts += ["--metric", self.metric]
        return shlex.join(parts)

    def run_command(self, run):
        """Shell line that reproduces one run by hand (runner env, plan env, launcher)."""
        env = dict(run.runner_env(), **run.env)
        return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + self.display_launcher()


# ---------------------------------------------------------------------------------------------------------
# The target script (imported only to validate a plan before launching it)
# ---------------------------------------------------------------------------------------------------------


_SCRIPTS = {}


def import_script(path):
    """Import train_gpt.py (readable or packed) from `path` under a private module name (cached)."""
    path = Path(path).resolve()
    if path not in _SCRIPTS:
        if not path.exists():
            raise AblationError(f"--script {path}: file not found")
        name = f"_ablate_target_{len(_SCRIPTS)}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the script is executing
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise AblationError(f"--script {path}: cannot import it to check the plan ({type(e).__name__}: {e})")
        _SCRIPTS[path] = module
    return _SCRIPTS[path]


def config_field_names(tg):
    """Env var names the script reads as config (every Hyperparameters field upper-cased, PRESET, aliases)."""
    import dataclasses
    names = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)} | {"PRESET"}
    return names | set(getattr(tg, "KNOWN_ALIASES", {}))


def check_plan_with_script(tg, plan, runs):
    """Resolve and validate every run's config with the script's own rules; AblationError naming the run.

    A variant key that is no config field of the script is refused: the variant would silently equal the base."""
    fields = config_field_names(tg)
    for label, env in plan.variants[1:]:
        unknown = sorted(k for k in env if k not in fields)
        if unknown:
            raise AblationError(f"variant {label}: {', '.join(unknown)} is not a config field of {plan.script} "
                                f"(the variant would run the base config)")
    for run in runs:
        env = dict(run.env, **run.runner_env())
        try:
            cfg = tg.load_config(env)
            tg.validate_config(cfg, plan.nproc or 1)
        except tg.ConfigError as e:
            raise AblationError(f"run {run.run_id}: config error: {e}") from None


def batch_tokens_from_script(path):
    """A function env -> TRAIN_BATCH_TOKENS the script at `path` would use (preset default if unset)."""
    def batch_tokens(env):
        """TRAIN_BATCH_TOKENS of the config that `env` resolves to."""
        tg = import_script(path)
        try:
            return tg.load_config(dict(env, RUN_ID="probe")).train_batch_tokens
        except tg.ConfigError as e:
            raise AblationError(f"config error: {e}") from None
    return batch_tokens


# ---------------------------------------------------------------------------------------------------------
# Run state, resuming and launching
# ---------------------------------------------------------------------------------------------------------


def read_json(path):
    """Parse a JSON file; AblationError naming the file if it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AblationError(f"{path}: not valid JSON ({e})") from None


def failed_status(summary):
    """True if train_gpt.py marked the run failed (any status other than "ok"; older runs have none)."""
    return summary.get("status", "ok") != "ok"


def summary_complete(summary):
    """True when the run reached its final evaluation (train_gpt.py writes this total last)."""
    return "total_from_artifact_load" in (summary.get("eval_seconds") or {})


def run_state(run):
    """(state, detail, summary) of a run: state is ok | failed | interrupted | pending."""
    meta = read_json(run.meta_path) if run.meta_path.exists() else None
    summary = read_json(run.summary_path) if run.summary_path.exists() else None
    finished = meta is not None and meta.get("returncode") is not None
    if summary is not None:
        if failed_status(summary):
            detail = summary["status"] + (f": {summary['error']}" if summary.get("error") else "")
            return "failed", detail, summary
        if finished and meta["returncode"] != 0:
            return "failed", f"exit code {meta['returncode']} (see {run.log_path.name})", summary
        if summary_complete(summary):
            return "ok", "", summary
        if finished:
            return "failed", "finished without a final evaluation (no eval_seconds.total_from_artifact_load)", summary
        return "interrupted", "summary without a final evaluation and no recorded exit", summary
    if finished:
        return "failed", f"exit code {meta['returncode']}, no summary (see {run.stdout_path.name})", None
    if meta is not None or run.log_path.exists():
        return "interrupted", "started but never finished", None
    return "pending", "", None


def move_aside(run):
    """Move a run's existing files to <runs>/attempts/<run_id>.a<k>.* so a rerun starts clean."""
    present = [p for p in run.files() if p.exists()]
    if not present:
        return None
    attempts = run.dir / "attempts"
    attempts.mkdir(exist_ok=True)
    k = 1
    while any((attempts / f"{run.run_id}.a{k}{p.name[len(run.run_id):]}").exists() for p in present):
        k += 1
    for p in present:
        p.rename(attempts / f"{run.run_id}.a{k}{p.name[len(run.run_id):]}")
    return k


def utc_now():
    """Current UTC time as an ISO-8601 string with seconds."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def machine_facts():
    """What the runner can see of the machine: logical CPUs, CPUs available to it, GPU names via nvidia-smi."""
    facts = {"cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        facts["cpus_available"] = len(os.sched_getaffinity(0))
    else:
        facts["cpus_available"] = os.cpu_count()
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout
            facts["gpus"] = [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return facts


def write_json(path, data):
    """Write JSON atomically (tmp file + rename), 2-space indented with a trailing newline."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def child_env(plan, run, drop):
    """os.environ without inherited config vars (`drop`), plus the run's plan env and runner env."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(run.env)
    env.update(run.runner_env())
    return env


def launch(plan, run, drop, facts, timeout=None):
    """Run one train_gpt.py process to completion, recording meta (command, times, exit code); returns rc."""
    run.dir.mkdir(parents=True, exist_ok=True)
    meta = {"run_id": run.run_id, "variant": run.variant, "seed": run.seed, "runner": "tools/ablate.py",
            "command": plan.run_command(run), "env": run.env, "started_utc": utc_now(), **facts}
    write_json(run.meta_path, meta)
    t0 = time.time()
    with open(run.stdout_path, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(plan.launcher(), env=child_env(plan, run, drop), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait()
            meta["timeout_seconds"] = timeout
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise  # meta keeps no returncode: the run counts as interrupted and is rerun next time
    meta.update(finished_utc=utc_now(), wall_seconds=round(time.time() - t0, 1), returncode=rc)
    write_json(run.meta_path, meta)
    return rc


def tail(path, n=15):
    """Last n lines of a text file ('' if missing)."""
    if not Path(path).exists():
        return ""
    return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


# ---------------------------------------------------------------------------------------------------------
# Honesty checks (import-free: they read only the summaries)
# ---------------------------------------------------------------------------------------------------------


def env_matches(raw, value):
    """Whether env string `raw` parses to the summary config `value` (typed like train_gpt.py parses it)."""
    if isinstance(value, bool):
        return raw.strip().lower() in (TRUE_WORDS if value else FALSE_WORDS)
    if isinstance(value, int):
        try:
            return int(raw) == value
        except ValueError:
            return False
    if isinstance(value, float):
        try:
            return float(raw) == value
        except ValueError:
            return False
    return raw == ("" if value is None else str(value))


def check_runs(plan, loaded):
    """Refuse summaries that do not belong together; loaded is [(run, summary)], base runs first."""
    if not loaded:
        return
    good = [(r, s) for r, s in loaded if summary_complete(s) and not failed_status(s)]
    ref_run, ref = sorted(good or loaded, key=lambda rs: rs[0].variant != "base")[0]
    ref_keys = set(plan.variant_env(ref_run.variant))
    for run, s in loaded:
        where = f"run {run.run_id} ({run.summary_path})"
        if s.get("run_id") != run.run_id or s.get("seed") != run.seed:
            raise AblationError(f"{where}: summary is of run_id={s.get('run_id')!r} seed={s.get('seed')!r}, "
                                f"not this run")
        cfg = s.get("config") or {}
        for key, raw in run.env.items():
            if key == "PRESET":
                if s.get("preset") != raw:
                    raise AblationError(f"{where}: summary preset is {s.get('preset')!r} but the plan sets "
                                        f"PRESET={raw} (a stale run from another plan? move it away or use a new "
                                        f"--name)")
            elif key == "FLOAT_CHECKPOINT" and raw == "auto":  # the trainer resolves it to ARTIFACT_PATH.float.pt
                if cfg.get("float_checkpoint") != f"{run.artifact_path}.float.pt":
                    raise AblationError(f"{where}: summary has float_checkpoint={cfg.get('float_checkpoint')!r}, "
                                        f"not this run's {run.artifact_path}.float.pt (a stale run? use a new --name)")
            elif key.lower() in cfg and not env_matches(raw, cfg[key.lower()]):
                raise AblationError(f"{where}: summary has {key.lower()}={cfg[key.lower()]!r} but the plan sets "
                                    f"{key}={raw} (a stale run from another plan? move it away or use a new --name)")
            elif key.lower() not in cfg and key in plan.variant_env(run.variant) and key != "PRESET":
                raise AblationError(f"{where}: variant '{run.variant}' sets {key} but the run's config has no field "
                                    f"{key.lower()}: the variant changed nothing")
        fp, ref_fp = s.get("fingerprint"), ref.get("fingerprint")
        if (fp is None or failed_status(s)) and not summary_complete(s):
            continue  # a failed run without a fingerprint is listed as failed, never averaged
        if not isinstance(fp, dict) or not isinstance(ref_fp, dict):
            bad = run if not isinstance(fp, dict) else ref_run
            raise AblationError(f"run {bad.run_id}: summary has no data fingerprint; cannot prove that the runs "
                                f"used the same data (rerun it with a train_gpt.py that writes 'fingerprint')")
        if run.variant in plan.data_variants:
            check_same_val_text(where, s, ref_run, ref, plan.val_bytes_rtol)
            continue  # other tokens: the config may differ in its data fields, the text scored may not
        for key in FINGERPRINT_KEYS:
            if fp.get(key) != ref_fp.get(key):
                raise AblationError(f"{where}: different data than {ref_run.run_id}: fingerprint.{key} = "
                                    f"{fp.get(key)!r} vs {ref_fp.get(key)!r}; runs on different data are not "
                                    f"combined in one table")
        for key in SETUP_KEYS:
            if s.get(key) != ref.get(key):
                raise AblationError(f"{where}: {key}={s.get(key)!r} differs from {ref_run.run_id} "
                                    f"({ref.get(key)!r}); runs on different setups are not combined in one table")
        own_keys = set(plan.variant_env(run.variant))
        if "PRESET" in own_keys | ref_keys:
            continue  # a variant that changes the preset changes every preset default: compared on data only
        ref_cfg = ref.get("config") or {}
        for key in sorted(set(cfg) | set(ref_cfg)):
            if key in PER_RUN_CONFIG_KEYS or key.upper() in own_keys | ref_keys:
                continue
            if cfg.get(key, "<absent>") != ref_cfg.get(key, "<absent>"):
                raise AblationError(f"{where}: base config differs from {ref_run.run_id} in {key}: "
                                    f"{cfg.get(key, '<absent>')!r} vs {ref_cfg.get(key, '<absent>')!r}, and variant "
                                    f"'{run.variant}' does not set {key.upper()} (different code or defaults?)")


def implied_val_bytes(summary):
    """Validation bytes behind a run's BPB (scored tokens x loss / (ln 2 x bpb)) from its first scored stage,
    or None when the summary lacks the numbers."""
    tokens = (summary.get("legality") or {}).get("scored_tokens")
    for stage in STAGES:
        r = (summary.get("results") or {}).get(stage) or {}
        if tokens and r.get("val_loss") and r.get("val_bpb"):
            return tokens * r["val_loss"] / (math.log(2) * r["val_bpb"])
    return None


def check_same_val_text(where, summary, ref_run, ref, rtol=0.0):
    """AblationError unless a data variant's run scored as many validation bytes as the base run (within half
    a byte, or `rtol` relative)."""
    mine, theirs = implied_val_bytes(summary), implied_val_bytes(ref)
    if mine is None or theirs is None:
        raise AblationError(f"{where}: cannot compute the validation byte count (legality.scored_tokens and a "
                            f"stage's val_loss/val_bpb are needed) to prove it scored {ref_run.run_id}'s text")
    if abs(mine - theirs) > max(0.5, rtol * theirs):
        raise AblationError(f"{where}: a data variant must score the same validation text as {ref_run.run_id}, "
                            f"but its BPB implies {mine:,.1f} validation bytes vs {theirs:,.1f}"
                            + (f" (beyond --val-bytes-rtol {rtol})" if rtol else ""))


# ---------------------------------------------------------------------------------------------------------
# Statistics and the table
# ---------------------------------------------------------------------------------------------------------


def mean_std(values):
    """(mean, sample std or None, n) of a list of numbers; (None, None, 0) when empty."""
    values = list(values)
    if not values:
        return None, None, 0
    return ms.mean(values), ms.sample_std(values), len(values)


def welch_two_sided(a, b):
    """Two-sided Welch t-test of mean(a) != mean(b): dict(t, dof, p_value, p_method), or None if undefined.

    Undefined when either side has fewer than 2 values or both have zero variance."""
    ma, sa, na = mean_std(a)
    mb, sb, nb = mean_std(b)
    if na < 2 or nb < 2 or (sa == 0 and sb == 0):
        return None
    t, dof = ms.welch_statistic(ma, sa, na, mb, sb, nb)
    p_upper, method = ms.student_t_sf(abs(t), dof)
    return {"t": t, "dof": dof, "p_value": min(1.0, 2.0 * p_upper), "p_method": method}


def paired_two_sided(pairs):
    """Two-sided paired t-test over (variant, base) values of the same seeds: dict(mean, se, t, dof, p_value,
    p_method, n), or None with fewer than 2 pairs. Identical pairs give se 0 and no t (nothing to test)."""
    diffs = [a - b for a, b in pairs]
    m, sd, n = mean_std(diffs)
    if n < 2:
        return None
    if sd == 0:
        return {"mean": m, "se": 0.0, "t": None, "dof": n - 1, "p_value": None, "p_method": None, "n": n}
    se = sd / math.sqrt(n)
    p_upper, method = ms.student_t_sf(abs(m / se), n - 1)
    return {"mean": m, "se": se, "t": m / se, "dof": n - 1, "p_value": min(1.0, 2.0 * p_upper),
            "p_method": method, "n": n}


def final_stage(plan, ok_summaries):
    """The stage to compare: --metric, else the latest stage every ok run has (TTT > sliding > quantized > pre)."""
    if plan.metric:
        return plan.metric
    for stage in reversed(STAGES):
        if ok_summaries and all(stage in (s.get("results") or {}) for s in ok_summaries):
            return stage
    return None


def stage_bpb(summary, stage):
    """val_bpb of one stage of a summary, or None when that stage did not run."""
    res = (summary.get("results") or {}).get(stage)
    return res.get("val_bpb") if isinstance(res, dict) else None


def run_row(run, state, detail, summary):
    """Per-run record for results.json and the runs table."""
    row = {"run_id": run.run_id, "variant": run.variant, "seed": run.seed, "status": state}
    if detail:
        row["detail"] = detail
    if summary:
        row["val_bpb"] = {st: stage_bpb(summary, st) for st in STAGES if stage_bpb(summary, st) is not None}
        for key in ("steps", "train_time_ms", "bytes_total", "bytes_code", "model_params"):
            if summary.get(key) is not None:
                row[key] = summary[key]
        if summary.get("steps"):
            row["ms_per_step"] = summary["train_time_ms"] / summary["steps"]
    return row


def build_results(plan, states):
    """results.json content: plan, per-run rows, per-variant aggregates with deltas and Welch tests."""
    ok = {r.run_id: s for r, (st, _, s) in states.items() if st == "ok"}
    stage = final_stage(plan, list(ok.values()))
    rows = [run_row(r, *states[r]) for r in plan.runs]
    base_values = [stage_bpb(ok[r.run_id], stage) for r in plan.runs if r.variant == "base" and r.run_id in ok]
    base_by_seed = {r.seed: stage_bpb(ok[r.run_id], stage) for r in plan.runs
                    if r.variant == "base" and r.run_id in ok}
    table = []
    for label, env in plan.variants:
        runs = [r for r in plan.runs if r.variant == label]
        good = [ok[r.run_id] for r in runs if r.run_id in ok]
        entry = {"variant": label, "overrides": env, "n": len(good), "runs": len(runs),
                 "failed": [{"run_id": r.run_id, "status": states[r][0], "detail": states[r][1]}
                            for r in runs if states[r][0] != "ok"],
                 "stages": {}}
        for st in STAGES:
            vals = [stage_bpb(s, st) for s in good if stage_bpb(s, st) is not None]
            if vals:
                m, sd, n = mean_std(vals)
                entry["stages"][st] = {"mean": m, "std": sd, "n": n}
        m, sd, n = mean_std(s["train_time_ms"] / s["steps"] for s in good if s.get("steps"))
        entry["ms_per_step"] = {"mean": m, "std": sd, "n": n}
        entry["bytes_total_mean"] = mean_std(s["bytes_total"] for s in good if s.get("bytes_total") is not None)[0]
        vals = [stage_bpb(s, stage) for s in good]
        if label != "base" and stage and vals and base_values:
            delta = ms.mean(vals) - ms.mean(base_values)
            sa, sb = ms.sample_std(vals), ms.sample_std(base_values)
            se = None if sa is None or sb is None else math.sqrt(sa ** 2 / len(vals) + sb ** 2 / len(base_values))
            entry["delta"] = {"stage": stage, "mean": delta, "se": se}
            entry["welch"] = welch_two_sided(vals, base_values)
            pairs = [(stage_bpb(ok[r.run_id], stage), base_by_seed[r.seed]) for r in runs
                     if r.run_id in ok and base_by_seed.get(r.seed) is not None]
            entry["paired"] = paired_two_sided(pairs)
        table.append(entry)
    base_ids = {r.run_id for r in plan.runs if r.variant == "base"}
    fingerprints = [s.get("fingerprint") for rid, s in ok.items() if rid in base_ids]
    first = next(iter(ok.values()), {})
    implied = {r: implied_val_bytes(ok[r.run_id]) for r in plan.runs if r.run_id in ok}
    val_bytes = {label: sorted({round(b) for r, b in implied.items() if r.variant == label and b})
                 for label in ["base"] + sorted(plan.data_variants)}
    return {"name": plan.name, "command": plan.canonical_command(), "script": str(plan.script),
            "launcher": plan.display_launcher(), "budget": plan.budget_note, "base_env": plan.base_env,
            "common_env": plan.common_env, "seeds": plan.seeds, "metric": stage,
            "fingerprint": {k: fingerprints[0].get(k) for k in FINGERPRINT_KEYS} if fingerprints else None,
            "data_variants": sorted(plan.data_variants),
            "val_bytes": val_bytes, "val_bytes_rtol": plan.val_bytes_rtol,
            "setup": {k: first.get(k) for k in SETUP_KEYS} if first else None,
            "preset": first.get("preset"),
            "variants": table, "runs": rows,
            "run_commands": {label: plan.run_command(next(r for r in plan.runs if r.variant == label))
                             for label, _ in plan.variants}}


def fmt(value, digits=6, signed=False):
    """A number to `digits` decimals ('—' for None), with a sign when signed."""
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_mean_std(cell, digits=6, total_n=None):
    """'mean ± std' of an aggregate cell ('—' if empty; no ± for n=1; '(n=k)' when fewer than total_n)."""
    if not cell or cell.get("mean") is None:
        return "—"
    text = fmt(cell["mean"], digits)
    if cell.get("std") is not None:
        text += f" ± {fmt(cell['std'], digits)}"
    if total_n is not None and cell["n"] != total_n:
        text += f" (n={cell['n']})"
    return text


def fmt_p(welch):
    """p-value cell: 3 significant digits plus the Welch dof, or '—' when the test is undefined."""
    if not welch:
        return "—"
    return f"{welch['p_value']:.3g} (t={welch['t']:.2f}, dof={welch['dof']:.1f})"


def fmt_paired(paired):
    """Paired-delta cell: mean ± se and p (3 significant digits), 'identical per seed' for zero spread."""
    if not paired:
        return "—"
    if paired["t"] is None:
        return fmt(paired["mean"], 6, True) + (" (identical per seed)" if paired["mean"] == 0 else " (no spread)")
    return f"{fmt(paired['mean'], 6, True)} ± {fmt(paired['se'], 6)}, p {paired['p_value']:.3g}"


def render_markdown(res):
    """results.md text: setup, the variant table, base noise, failures, per-run table and commands."""
    stages = [st for st in STAGES if any(st in v["stages"] for v in res["variants"])]
    stage = res["metric"]
    label = STAGE_LABELS.get(stage, stage)
    out = [f"# Ablation: {res['name']}", ""]
    fp, setup = res["fingerprint"], res["setup"]
    if setup:
        out.append(f"- Setup: preset `{res['preset']}`, device {setup['device']}, world size {setup['world_size']}, "
                   f"torch {setup['pytorch_version']}; launcher `{res['launcher']}`")
    out.append(f"- Budget: {res['budget']}")
    if fp:
        out.append(f"- Data: tokenizer sha256 {str(fp['tokenizer_sha256'])[:16]}…, vocab {fp['vocab_size']}, "
                   f"{fp['val_tokens']} val tokens, {fp['train_shards']} train shard(s), byte sidecar "
                   f"{fp['bytes_sidecar']} " + ("(identical for every run in this table)" if not res.get("data_variants")
                                                else f"(every run but those of {', '.join(res['data_variants'])}, "
                                                     f"which use other tokens for the same validation text; "
                                                     f"validation bytes scored, checked per run: "
                                                     + "; ".join(f"{k} {', '.join(f'{b:,}' for b in v)}"
                                                                 for k, v in res["val_bytes"].items())
                                                     + (f", allowed to differ by {res['val_bytes_rtol']:.2%}"
                                                        if res["val_bytes_rtol"] else "") + ")"))
    out.append(f"- Seeds: {', '.join(map(str, res['seeds']))}; compared stage: "
               f"{stage + ' val_bpb' if stage else 'none (no successful run)'}")
    out += ["", "| Variant | Overrides | n | " + " | ".join(STAGE_LABELS[st] + " val_bpb" for st in stages)
            + f" | Δ {label} vs base | p (Welch, two-sided) | Δ paired by seed | ms/step | Artifact bytes |",
            "|---|---|---:|" + "---:|" * len(stages) + "---:|---:|---:|---:|---:|"]
    for v in res["variants"]:
        n = str(v["n"]) + (f" (+{len(v['failed'])} failed)" if v["failed"] else "")
        overrides = ",".join(f"{k}={val}" for k, val in v["overrides"].items()) or "—"
        cells = [v["variant"], f"`{overrides}`" if v["overrides"] else overrides, n]
        cells += [fmt_mean_std(v["stages"].get(st), 6, v["n"]) for st in stages]
        d = v.get("delta")
        if v["variant"] == "base":
            cells += ["(reference)", "—", "—"]
        else:
            se = "" if not d or d["se"] is None else f" ± {fmt(d['se'], 6)}"
            cells.append("—" if not d else fmt(d["mean"], 6, True) + se)
            cells.append(fmt_p(v.get("welch")))
            cells.append(fmt_paired(v.get("paired")))
        cells.append(fmt_mean_std(v["ms_per_step"], 1))
        cells.append("—" if v["bytes_total_mean"] is None else f"{v['bytes_total_mean']:,.0f}")
        out.append("| " + " | ".join(cells) + " |")
    base = res["variants"][0]
    base_cell = base["stages"].get(stage) if stage else None
    out.append("")
    if base_cell and base_cell["std"] is not None:
        out.append(f"**Seed-to-seed std of base ({label} val_bpb): {base_cell['std']:.6f} (n={base_cell['n']}).** "
                   f"A delta much smaller than this is not resolved by {base_cell['n']} seeds.")
    else:
        out.append(f"**Seed-to-seed std of base: not available (n={base_cell['n'] if base_cell else 0}; needs "
                   f"2 or more successful base seeds).**")
    out.append("")
    out.append(f"Values: mean ± sample std (n−1) over the successful seeds. Δ = variant mean − base mean of "
               f"{label} val_bpb (negative = better) ± its standard error; p from Welch's unequal-variance "
               f"t-test, two-sided. Δ paired: mean ± standard error of the per-seed differences (variant − base "
               f"of the same seed: same init and data order, or the same weights in an export-only ablation) "
               f"with a two-sided paired t-test (dof = pairs − 1). ms/step = train_time_ms / steps (runs that "
               f"shared the cores with other work are slower); artifact bytes = bytes_total (model + code).")
    failed = [f for v in res["variants"] for f in v["failed"]]
    out.append("")
    if failed:
        out.append(f"**Failed or unfinished runs ({len(failed)}, excluded from the means):**")
        out += [f"- {f['run_id']}: {f['status']} — {f['detail']}" for f in failed]
    else:
        out.append("Failed runs: none.")
    out += ["", "## Runs", "",
            "| Run | Variant | Seed | Status | Steps | ms/step | " + " | ".join(STAGE_LABELS[st] for st in stages)
            + " | Artifact bytes |",
            "|---|---|---:|---|---:|---:|" + "---:|" * len(stages) + "---:|"]
    for r in res["runs"]:
        bpb = r.get("val_bpb") or {}
        cells = [r["run_id"], r["variant"], str(r["seed"]), r["status"], str(r.get("steps", "—")),
                 fmt(r.get("ms_per_step"), 1)] + [fmt(bpb.get(st), 8) for st in stages]
        cells.append(f"{r['bytes_total']:,}" if r.get("bytes_total") is not None else "—")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "## Commands", "", "Ablation (rerun it to resume; finished runs are not rerun):", "", "```",
            res["command"], "```", "", "One run of each variant by hand (SEED/RUN_ID change per seed):", "", "```"]
    out += [res["run_commands"][v["variant"]] for v in res["variants"]]
    out += ["```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------------------

PANELS = (("train_loss_vs_step", "train", "loss", "step"), ("train_loss_vs_time", "train", "loss", "time"),
          ("val_bpb_vs_step", "val", "val_bpb", "step"), ("val_bpb_vs_time", "val", "val_bpb", "time"))


def curve_series(plan, summaries):
    """{panel: [series]} for the 4 panels; a series is dict(run_id, variant, seed, x, y, color, style).

    summaries: {run_id: summary} of the runs to draw (those with curves). x is the step, or train_ms / 1000
    (seconds of training wallclock, eval pauses excluded)."""
    variants = [label for label, _ in plan.variants]
    out = {name: [] for name, *_ in PANELS}
    for run in plan.runs:
        s = summaries.get(run.run_id)
        curves = (s or {}).get("curves")
        if not curves:
            continue
        for name, kind, column, axis in PANELS:
            cols = curves.get(f"{kind}_columns") or []
            rows = curves.get(kind) or []
            if column not in cols:
                continue
            yi, xi = cols.index(column), cols.index("step" if axis == "step" else "train_ms")
            x = [row[xi] if axis == "step" else row[xi] / 1000.0 for row in rows]
            out[name].append({"run_id": run.run_id, "variant": run.variant, "seed": run.seed, "x": x,
                              "y": [row[yi] for row in rows], "color": variants.index(run.variant),
                              "style": plan.seeds.index(run.seed) % len(LINE_STYLES)})
    return out


def plot_curves(series, path, title=""):
    """Draw the 4 panels to `path` (PNG); returns the matplotlib Figure, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = {"train_loss_vs_step": ("step", "train loss"), "train_loss_vs_time": ("train wallclock (s)", "train loss"),
              "val_bpb_vs_step": ("step", "val_bpb (in-training evals)"),
              "val_bpb_vs_time": ("train wallclock (s)", "val_bpb (in-training evals)")}
    for ax, (name, *_rest) in zip(axes.flat, PANELS):
        for sr in series[name]:
            ax.plot(sr["x"], sr["y"], color=colors[sr["color"] % len(colors)], linestyle=LINE_STYLES[sr["style"]],
                    marker="o" if name.startswith("val") else None, markersize=3, linewidth=1.2,
                    label=f"{sr['variant']} s{sr['seed']}")
        ax.set_xlabel(labels[name][0])
        ax.set_ylabel(labels[name][1])
        ax.grid(alpha=0.3)
        if series[name]:
            ax.legend(fontsize=7)
    fig.suptitle(title or "ablation curves: colour = variant, line style = seed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


class ArgsFileParser(argparse.ArgumentParser):
    """argparse with @file plans: one argument per line, '# comments', '--flag value' split once."""

    def convert_arg_line_to_args(self, arg_line):
        """One line of a plan file -> its arguments."""
        line = arg_line.strip()
        if not line or line.startswith("#"):
            return []
        if line.startswith("--") and " " in line:
            flag, value = line.split(None, 1)
            return [flag, value.strip()]
        return [line]


def parse_args(argv):
    """Command-line interface."""
    p = ArgsFileParser(description=__doc__.split("\n\n")[0], fromfile_prefix_chars="@",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="ablation name: RUN_IDs are <name>_<variant>_s<seed> (default: out dir name)")
    p.add_argument("--out-dir", help="output dir (default bench/results/<name>); runs go to <out>/runs")
    p.add_argument("--base", default="", help="base env, 'K=V,K=V' (e.g. PRESET=minigolf)")
    p.add_argument("--env", action="append", help="more base env 'K=V[,K=V]' (repeatable; any env var)")
    p.add_argument("--variant", action="append", help="'label=K=V[,K=V]' overrides on top of the base (repeatable)")
    p.add_argument("--seeds", default="1337", help="comma-separated seeds (default 1337)")
    p.add_argument("--val-bytes-rtol", type=float, default=0.0,
                   help="relative tolerance of a data variant's validation byte count (default: half a byte)")
    p.add_argument("--data-variant", action="append",
                   help="label of a variant that uses other tokens (tokenizer/shards, e.g. CaseOps) for the same "
                        "validation text (repeatable): its data fingerprint may differ, its val byte count may not")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--iterations", type=int, help="step budget: ITERATIONS=N, MAX_WALLCLOCK_SECONDS=0")
    budget.add_argument("--train-tokens", type=int, help="token budget: ITERATIONS=ceil(T / TRAIN_BATCH_TOKENS)")
    p.add_argument("--nproc", type=int, default=0, help="launch with torchrun --nproc_per_node=N (default: python3)")
    p.add_argument("--script", default="train_gpt.py",
                   help="trainer to run (default train_gpt.py; a packed copy works)")
    p.add_argument("--metric", choices=STAGES, help="stage to compare (default: latest stage every run has)")
    p.add_argument("--retry-failed", action="store_true", help="rerun failed runs (their files are moved aside)")
    p.add_argument("--no-run", action="store_true", help="launch nothing; tabulate the runs that exist")
    p.add_argument("--dry-run", action="store_true", help="check the plan and print what would run, then stop")
    p.add_argument("--timeout", type=float, help="kill a run after this many seconds (it is then failed)")
    return p.parse_args(argv)


def tabulate(plan, states):
    """Write results.json, results.md and curves.png for the current run states; returns the markdown."""
    res = build_results(plan, states)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(plan.out_dir / "results.json", res)
    md = render_markdown(res)
    (plan.out_dir / "results.md").write_text(md, encoding="utf-8")
    drawn = {r.run_id: s for r, (_, _, s) in states.items() if s and s.get("curves")}
    fig = plot_curves(curve_series(plan, drawn), plan.out_dir / "curves.png", f"ablation {plan.name}")
    if fig is None:
        print("note: matplotlib is not installed, curves.png not written (pip install matplotlib)")
    return md


def collect_states(plan):
    """{run: (state, detail, summary)} for every run of the plan."""
    return {run: run_state(run) for run in plan.runs}


def checked(plan, states):
    """check_runs on every run that has a summary (base runs first)."""
    with_summary = [(r, s) for r, (_, _, s) in states.items() if s is not None]
    with_summary.sort(key=lambda rs: rs[0].variant != "base")
    check_runs(plan, with_summary)


def main(argv=None):
    """Entry point: 0 when every run succeeded, 1 when some failed, 2 when the plan or runs are refused."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plan = Plan(args)
        plan.resolve(batch_tokens_from_script(plan.script))  # imports the script only if it must
        states = collect_states(plan)
        checked(plan, states)
        todo = [r for r in plan.runs if states[r][0] in ("pending", "interrupted")
                or (args.retry_failed and states[r][0] == "failed")]
        for r in plan.runs:
            if r not in todo:
                print(f"skip {r.run_id}: {states[r][0]}" + (f" ({states[r][1]})" if states[r][1] else ""))
        if todo and not args.no_run:
            tg = import_script(plan.script)
            check_plan_with_script(tg, plan, todo)
            if args.dry_run:
                for r in todo:
                    print(f"would run {r.run_id} ({states[r][0]}): {plan.run_command(r)}")
                return 0
            drop = config_field_names(tg)
            facts = machine_facts()
            for i, run in enumerate(todo, 1):
                moved = move_aside(run)
                note = f" (earlier files moved to attempts/ as a{moved})" if moved else ""
                print(f"[{i}/{len(todo)}] {run.run_id}: running{note}", flush=True)
                t0 = time.time()
                rc = launch(plan, run, drop, facts, args.timeout)
                state, detail, summary = run_state(run)
                if state == "ok":
                    stage = final_stage(plan, [summary])
                    print(f"[{i}/{len(todo)}] {run.run_id}: ok in {time.time() - t0:.0f}s, {stage} val_bpb "
                          f"{stage_bpb(summary, stage):.8f}", flush=True)
                else:
                    print(f"[{i}/{len(todo)}] {run.run_id}: FAILED ({detail}; exit {rc})\n{tail(run.stdout_path)}",
                          flush=True)
            states = collect_states(plan)
            checked(plan, states)
        elif args.dry_run:
            print("nothing to run")
            return 0
        md = tabulate(plan, states)
    except AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md)
    print(f"wrote {plan.out_dir / 'results.md'}, results.json" +
          (", curves.png" if (plan.out_dir / "curves.png").exists() else ""))
    return 0 if all(st == "ok" for st, _, _ in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
