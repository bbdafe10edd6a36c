"""Shared by test_ablate.py and test_make_record.py: one packed trainer and one tiny 2-variant x 2-seed
ablation per pytest session (cached at module level, like pipeline_helpers), plus in-process CLI calls.

The ablation runs the packed copy of train_gpt.py: a packed file counts its own size, while the readable
source re-packs itself twice per run (~20 s each on a loaded 2-core box), which would dominate the test time.
"""
import contextlib
import importlib.util
import io
import sys
import time
from pathlib import Path

import pipeline_helpers
from conftest import ROOT, tg

TOOLS = ROOT / "tools"
NAME = "tiny"
VARIANT = ("lr", "MATRIX_LR=0.05")
SEEDS = (1, 2)
ITERATIONS = 6
_CACHE = {}


def load_tool(name):
    """Import tools/<name>.py once (the tools import each other by module name, so register it)."""
    if name not in sys.modules:
        if str(TOOLS) not in sys.path:
            sys.path.insert(0, str(TOOLS))
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def call(main, argv):
    """Run a tool's main(argv) in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def packed_trainer(factory):
    """Path of the packed (self-extracting) train_gpt.py, built in-process once per session."""
    if "packed" not in _CACHE:
        path = factory.mktemp("packed") / "train_gpt.py"
        path.write_text(tg.pack_source((ROOT / "train_gpt.py").read_text(encoding="utf-8")), encoding="utf-8")
        _CACHE["packed"] = path
    return _CACHE["packed"]


def ablation_args(factory, out_dir, variant=VARIANT, extra=()):
    """ablate.py arguments of the tiny plan (TINY_RUN_ENV on the smoke data, step budget) writing to out_dir."""
    data_dir, small_val, _tok = pipeline_helpers.smoke_data(factory)
    base = {k: v for k, v in pipeline_helpers.TINY_RUN_ENV.items() if k not in ("ITERATIONS", "MAX_WALLCLOCK_SECONDS")}
    args = ["--name", NAME, "--out-dir", out_dir, "--base", ",".join(f"{k}={v}" for k, v in base.items()),
            "--env", f"DATA_DIR={data_dir}", "--env", f"VAL_FILES={small_val}",
            "--env", "OMP_NUM_THREADS=1", "--env", "MKL_NUM_THREADS=1",
            "--seeds", ",".join(map(str, SEEDS)), "--iterations", ITERATIONS, "--script", packed_trainer(factory)]
    if variant:
        args += ["--variant", f"{variant[0]}={variant[1]}"]
    return [str(a) for a in args] + [str(a) for a in extra]


def tiny_ablation(factory):
    """The tiny 2x2 ablation, run once: dict(out_dir, rc, stdout, stderr, seconds, args)."""
    if "ablation" not in _CACHE:
        ablate = load_tool("ablate")
        out_dir = factory.mktemp("ablation") / NAME
        args = ablation_args(factory, out_dir)
        t0 = time.time()
        rc, out, err = call(ablate.main, args)
        _CACHE["ablation"] = dict(out_dir=Path(out_dir), rc=rc, stdout=out, stderr=err,
                                  seconds=time.time() - t0, args=args)
    return _CACHE["ablation"]
