"""Source-level guarantees: valid on Python 3.10, one section banner per stage in data-flow order,
device-specific calls confined to the runtime section, and a contract docstring on every top-level def."""
import ast
import glob
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

PROJECT_FILES = sorted(p for p in ROOT.rglob("*.py") if ".git" not in p.parts)
STAGES = ["CONFIG", "RUNTIME", "DATA", "TOKENIZER AND BPB", "MODEL", "OPTIMIZERS", "TRAINING LOOP", "EXPORT",
          "EVALUATION", "REPORTING", "MAIN"]


@pytest.mark.parametrize("path", PROJECT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_parses_with_python_310_grammar(path):
    """GPU images often ship Python 3.10: no 3.11+ syntax anywhere in the project."""
    ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 10))


def python_version(minor):
    """Path of a working Python 3.<minor> interpreter (PATH or pyenv), or None."""
    candidates = [shutil.which(f"python3.{minor}")] + sorted(
        glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3")))
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", f"import sys; assert sys.version_info[:2] == (3, {minor})"],
                          capture_output=True).returncode == 0:
            return exe
    return None


def python310():
    """Path of a working Python 3.10 interpreter (PATH or pyenv), or None."""
    return python_version(10)


# A module with the f-string shapes that differ across Python versions (string constants and quotes inside
# replacement fields, conversions, format specs), a folded switch inside an f-string, and dead code.
FSTRING_SNIPPET = '''
def report(cfg, result, looped, width):
    head = f"legality: positions={result['positions']} once={result['once']!s:>5}"
    label = f"{'loop_warmup_step' if looped else 'warmup_step'}: {', '.join(sorted(result))}"
    mode = f"COMPRESSOR={cfg.compressor!r} x={width:>{width}} {cfg.lqer}"
    if cfg.lqer:
        mode += f" {len('utf-8'.encode('utf-8'))}"
    return head + label + mode
report
'''


def packer_module_source():
    """The packer's definitions from train_gpt.py as a module that needs neither torch nor numpy."""
    tree = ast.parse((ROOT / "train_gpt.py").read_text(encoding="utf-8"))
    import train_gpt as tg
    keep = set(tg.PACK_OMIT) | {"ConfigError", "NotPacked", "PACK_OMIT", "PACK_NEEDS", "PACK_DICTS", "PACKED",
                                "_UNKNOWN", "literal_value", "truth", "is_pure", "simplify_test", "fill_empty_bodies",
                                "bound_names", "specialise", "replace_with_stand_ins", "masked_dump"}
    body = [n for n in tree.body if isinstance(n, ast.Import) and n.names[0].name in ("ast", "copy")]
    body += [n for n in tree.body if (getattr(n, "name", None) in keep)
             or (isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) in keep)]
    return ast.unparse(ast.Module(body=body, type_ignores=[]))


@pytest.mark.parametrize("minor", [12, 13])
def test_packing_on_a_newer_python_gives_the_same_copy_and_it_reads_on_310(minor, tmp_path):
    """The packer on Python 3.12/3.13 (which unparse and tokenize f-strings differently) writes the same
    minified text as here, and that text compiles under Python 3.10."""
    import train_gpt as tg
    newer, old = python_version(minor), python310()
    if newer is None or old is None:
        pytest.skip(f"needs Python 3.{minor} and 3.10 interpreters")
    script = tmp_path / "pack_snippet.py"
    script.write_text(packer_module_source() + "\nimport sys\nsys.stdout.write(minify_source(sys.stdin.read(), "
                      "{'compressor': 'brotli', 'lqer': False}))\n")
    proc = subprocess.run([newer, str(script)], input=FSTRING_SNIPPET, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    here = tg.minify_source(FSTRING_SNIPPET, {"compressor": "brotli", "lqer": False})
    assert proc.stdout == here
    assert "'brotli'" in here and "utf-8" not in here.split("def report")[1]  # folded; constants hoisted
    check = subprocess.run([old, "-c", "import sys; compile(sys.stdin.read(), 'x', 'exec')"], input=proc.stdout,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_compiles_under_a_real_python_310():
    """Byte-compile the trainer and its packed copy with an actual 3.10 interpreter."""
    import train_gpt as tg
    exe = python310()
    if exe is None:
        pytest.skip("no Python 3.10 interpreter on this machine")
    packed = tg.pack_source((ROOT / "train_gpt.py").read_text(encoding="utf-8"))
    for src in ((ROOT / "train_gpt.py").read_text(encoding="utf-8"), packed):
        proc = subprocess.run([exe, "-c", "import sys; compile(sys.stdin.read(), 'x', 'exec')"],
                              input=src, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_sections_in_data_flow_order_and_cuda_only_in_runtime():
    """Banners appear once each in the documented order; torch.cuda is called only in the runtime section."""
    src = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    banners = re.findall(r"^# =+\n# ([A-Z][A-Z /]+?)(?::|\n)", src, re.M)
    assert [b.strip() for b in banners] == STAGES
    runtime = src.index("# RUNTIME")
    data = src.index("# DATA")
    for m in re.finditer(r"torch\.cuda\.", src):
        assert runtime < m.start() < data, src[max(0, m.start() - 80):m.start() + 40]


def test_every_top_level_function_and_class_has_a_docstring():
    """Each public top-level def/class states its contract in a docstring."""
    tree = ast.parse((ROOT / "train_gpt.py").read_text(encoding="utf-8"))
    missing = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
               and ast.get_docstring(n) is None]
    assert not missing, missing


def test_technique_cost_table_switches_real_pack_switches():
    """bench/technique_costs.py prices each technique as the frontier copy minus the copy packed with the
    technique's switches flipped: every override must be a PACK_SWITCHES field and really change its value at
    PRESET=frontier, or the README's code-byte column silently measures nothing."""
    import importlib.util
    import train_gpt as tg
    spec = importlib.util.spec_from_file_location("technique_costs", ROOT / "bench" / "technique_costs.py")
    costs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(costs)
    frontier = tg.load_config({"PRESET": "frontier"})
    for technique, env in costs.TECHNIQUES.items():
        flipped = tg.load_config(dict(env, PRESET="frontier"))
        for key in env:
            assert key.lower() in tg.PACK_SWITCHES, (technique, key)
            assert getattr(flipped, key.lower()) != getattr(frontier, key.lower()), (technique, key)
