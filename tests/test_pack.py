"""The packer (`python3 train_gpt.py pack`): specialising the source to a configuration's switch values
(SwitchFolder, prune_unreferenced, NotPacked stand-ins), the base-124 encoding of its self-extracting stub, and
the packed copies of every preset. Folded code must compute exactly what the source computes for the values it
was built for, read no undefined name, and refuse a setting it was not built for."""
import ast
import functools
import itertools
import os
import random
import re
import subprocess

import pytest

import pipeline_helpers as ph
from conftest import ROOT, tg

SOURCE = (ROOT / "train_gpt.py").read_text(encoding="utf-8")


class Cfg:
    """A stand-in config object (the folder only looks at attribute names)."""

    def __init__(self, **values):
        self.__dict__.update(values)


def folded(source, switches, prune=True):
    """`source` folded for `switches` (and pruned), as source text."""
    tree = tg.fill_empty_bodies(tg.SwitchFolder(switches).visit(ast.parse(source)))
    return ast.unparse(tg.prune_unreferenced(tree) if prune else tree)


def run_module(source, **names):
    """Execute `source` as a module with `names` predefined; returns its namespace."""
    ns = dict(names)
    exec(compile(source, "<snippet>", "exec"), ns)
    return ns


# A function whose behaviour depends on two switches through every construct the folder rewrites: if/elif,
# a local assigned a folded constant, and/or/not in value and test position, conditional expressions,
# need() checks, loops, and a side-effecting call next to a constant operand.
SNIPPET = '''
calls = []

def probe(v):
    calls.append(v)
    return v

def need(cond, msg):
    if not cond:
        raise ValueError(msg)

def helper_fast():
    return "fast"

def helper_slow():
    return "slow"

def f(cfg, x):
    out = []
    fast = cfg.mode == "fast" and cfg.flag
    if fast:
        out.append(helper_fast())
    elif cfg.mode in ("slow", "auto"):
        out.append(helper_slow())
    else:
        out.append("other")
    out.append(x and cfg.flag)
    out.append(cfg.flag or x)
    out.append(x or cfg.flag)
    out.append(not cfg.flag)
    out.append(1 if cfg.mode != "auto" else 2)
    out.append(x if cfg.flag and x else None)
    out.append(cfg.mode == "fast" or cfg.mode == "slow")
    if probe(x) and cfg.flag:
        out.append("probe")
    if x and not cfg.flag:
        out.append("x-not-flag")
    need(cfg.mode in ("fast", "slow", "auto"), "MODE must be fast, slow or auto")
    for i in range(3):
        if not cfg.flag or i:
            out.append(i)
    return out

f
'''


@pytest.mark.parametrize("mode,flag", list(itertools.product(["fast", "slow", "auto", "weird"], [True, False])))
def test_folded_code_computes_what_the_source_computes(mode, flag):
    """For every switch combination and input, the folded module returns the same values, makes the same
    side-effecting calls and raises the same error as the original."""
    fold = folded(SNIPPET, {"mode": mode, "flag": flag})
    assert "cfg.mode" not in fold and "cfg.flag" not in fold
    for x in (0, 3, "", "s", None):
        results = []
        for text in (SNIPPET, fold):
            ns = run_module(text)
            try:
                results.append((ns["f"](Cfg(mode=mode, flag=flag), x), ns["calls"]))
            except ValueError as e:
                results.append((str(e), ns["calls"]))
        assert results[0] == results[1], (mode, flag, x)


def test_folding_drops_the_branches_and_definitions_that_cannot_run():
    """fast+flag: only helper_fast survives; the need() of a valid mode vanishes; the probe call stays."""
    fold = folded(SNIPPET, {"mode": "fast", "flag": True})
    assert "helper_slow" not in fold and "def helper_fast" in fold and "MODE must be" not in fold
    assert "probe(x)" in fold  # a call is never dropped, even next to a constant operand
    fold = folded(SNIPPET, {"mode": "weird", "flag": True})
    assert "MODE must be" in fold and "helper_fast" not in fold and "helper_slow" not in fold


def test_a_local_is_propagated_only_when_it_is_an_immutable_constant_assigned_once():
    src = '''
def g(cfg):
    out = []
    a = cfg.flag
    b = cfg.flag
    b = not b
    if a:
        out.append(1)
    if b:
        out.append(2)
    return out
g
'''
    fold = folded(src, {"flag": False})
    assert "out.append(1)" not in fold and "out.append(2)" in fold and "out = []" in fold
    assert run_module(fold)["g"](None) == run_module(src)["g"](Cfg(flag=False)) == [2]


def test_code_after_a_folded_raise_is_dropped_with_what_only_it_used():
    src = '''
def fit():
    return "fitted"
def export(cfg, over):
    if over:
        if not cfg.size_fit:
            raise ValueError("over the cap")
        return fit()
    return "fits"
export
'''
    for on in (True, False):
        fold = folded(src, {"size_fit": on})
        assert ("def fit" in fold) == on and ("over the cap" in fold) == (not on)
        for over in (True, False):
            results = []
            for text in (src, fold):
                try:
                    results.append(run_module(text)["export"](Cfg(size_fit=on), over))
                except ValueError as e:
                    results.append(str(e))
            assert results[0] == results[1], (on, over)


def test_folding_keeps_generators_subscript_errors_and_f_string_formats():
    """Unreachable code after a folded return is kept when it holds a yield (the function stays a generator);
    a subscript next to a deciding constant is kept (it can raise); constant f-string fields format exactly as
    at run time, with conversions and specs."""
    src = '''
def gen(cfg):
    if cfg.flag:
        return
    yield 1
def look(cfg, d):
    if d["k"] or cfg.flag:
        return "hit"
    return "miss"
def text(cfg, w):
    return f"{cfg.mode!r}|{cfg.mode}|{cfg.flag:>6}|{cfg.n:{w}}|{cfg.n!s:<4}|{cfg.mode.upper()}"
(gen, look, text)
'''
    fold = folded(src, {"flag": True, "mode": "fast", "n": 7})
    ns, orig = run_module(fold), run_module(src)
    cfg = Cfg(flag=True, mode="fast", n=7)
    assert list(ns["gen"](None)) == list(orig["gen"](cfg)) == []
    with pytest.raises(KeyError):
        ns["look"](None, {})
    assert ns["text"](None, 5) == orig["text"](cfg, 5) == "'fast'|fast|     1|    7|7   |FAST"
    assert "|fast|" in fold  # the constant fields became text


def test_prune_keeps_what_live_code_reaches_and_drops_the_rest():
    src = '''
import os
import json
try:
    import not_a_module
except ImportError:
    not_a_module = None
TABLE = {"a": 1}
UNUSED = [1, 2]
def a():
    return b() + TABLE["a"]
def b():
    return len(os.sep)
def c():
    return json.dumps(a())
if not_a_module is None:
    def kernel():
        return 0
    TILES = (1, 2)
print(a())
'''
    out = ast.unparse(tg.prune_unreferenced(ast.parse(src)))
    for kept in ("import os", "TABLE", "def a", "def b", "print(a())", "not_a_module = None"):
        assert kept in out, kept
    for gone in ("import json", "UNUSED", "def c", "def kernel", "TILES", "if not_a_module is None"):
        assert gone not in out, gone
    run_module(out)


def test_prune_keeps_an_import_that_probes_for_a_module():
    """An import in a try whose other statements stay decides which branch runs by failing: it is kept even
    though nothing names it (else the packed copy would take the success branch when the module is absent)."""
    src = '''
try:
    import not_a_module
    HAVE = True
except ImportError:
    HAVE = False
try:
    import json
except ImportError:
    json = None
print(HAVE)
'''
    out = ast.unparse(tg.prune_unreferenced(ast.parse(src)))
    assert "import not_a_module" in out and "import json" not in out
    assert run_module(out)["HAVE"] is False


def test_folding_away_the_only_yield_fails_the_pack():
    """A generator whose only yield sits in a branch the switches rule out would become a plain function that
    returns None: the pack stops instead; a yield that stays keeps it a generator and the pack goes on."""
    for bad in ("def gen(cfg):\n    if cfg.flag:\n        yield 1\n    return\n",
                "def gen(cfg):\n    on = cfg.flag\n    if on:\n        yield 1\n    return\n"):  # via a local
        with pytest.raises(RuntimeError, match="removed every yield of gen"):
            tg.SwitchFolder({"flag": False}).visit(ast.parse(bad))
    ok = "def gen(cfg):\n    if cfg.flag:\n        yield 1\n    yield 2\n"
    assert "yield 1" not in ast.unparse(tg.SwitchFolder({"flag": False}).visit(ast.parse(ok)))


def test_assigning_a_switch_outside_load_config_fails_the_pack():
    """Folding assumes a switch keeps its value once the config is loaded: a store to cfg.<switch> elsewhere
    stops the pack with the line number; load_config itself may set them."""
    bad = "def fix(cfg):\n    cfg.flag = False\n    return cfg.flag\n"
    with pytest.raises(RuntimeError, match="line 2 assigns the switch cfg.flag"):
        tg.SwitchFolder({"flag": True}).visit(ast.parse(bad))
    ok = "def load_config(cfg):\n    n = 3\n    cfg.flag = n > 2\n    return cfg\n"  # folded twice: still allowed
    assert "cfg.flag = True" in ast.unparse(tg.SwitchFolder({"flag": True}).visit(ast.parse(ok)))


def test_unresolved_globals_finds_every_dangling_name():
    src = '''
import os
x = 1
def f(a):
    return a + x + missing_one + len(os.sep)
class C:
    y = missing_two
    def m(self):
        return [z for z in missing_three]
def g():
    v = 1
    def h():
        nonlocal v
        return v + missing_four
    return h
'''
    assert tg.unresolved_globals(src) == ["missing_four", "missing_one", "missing_three", "missing_two"]
    assert tg.unresolved_globals(SOURCE) == []


def test_digits_round_trip_through_the_stub_formula_and_compile_as_a_literal():
    """encode_digits and the stub's `c-1-(c>13)-(c>34)-(c>92)` are inverse for any bytes (leading zeros
    included, via the fixed length); a triple-quoted literal of all 124 digits compiles and reads back."""
    formula = lambda c: c - 1 - (c > 13) - (c > 34) - (c > 92)
    assert [formula(c) for c in tg.PACK_DIGITS] == list(range(124)) and len(set(tg.PACK_DIGITS)) == 124
    rng = random.Random(0)
    for data in (b"", b"\x00", b"\x00\x00\x01", bytes(rng.randrange(256) for _ in range(3000)), b"\xff" * 40):
        n = 0
        for c in tg.encode_digits(data).encode("ascii"):
            n = n * 124 + formula(c)
        assert n.to_bytes(len(data), "big") == data
    literal = 'd = """' + tg.PACK_DIGITS.decode("ascii") * 2 + '"""\n'
    assert run_module(literal)["d"].encode("ascii") == tg.PACK_DIGITS * 2


def test_squeeze_keeps_the_program_and_leaves_f_strings_whole():
    src = 'def f(a, b=2):\n x = [a + b, -a, a if b else b]\n return f"{a + b} = {x!r:>10}" + "s " + str(1) \n'
    out = tg.squeeze_whitespace(src)
    assert tg.masked_dump(ast.parse(out)) == tg.masked_dump(ast.parse(src))
    assert "x=[a+b,-a,a if b else b]" in out and 'f"{a + b} = {x!r:>10}"' in out
    assert tg.squeeze_whitespace(out) == out


# ---------------------------------------------------------------------------------------------
# The packed copies of the real script
# ---------------------------------------------------------------------------------------------

FEATURES = {  # definitions only a switch value needs -> (switch, value that needs it)
    "SmearGate": ("smear_gate", True), "HeadGate": ("sparse_attn_gate", True), "LaneMix": ("parallel_lanes", True),
    "eval_ttt_lora_phased": ("ttt_mode", "lora_phased"), "LoraBank": ("ttt_mode", "lora_phased"),
    "add_lqer": ("lqer", True), "encode_ints": ("compressor", "pergroup"), "rans_decode": ("compressor", "pergroup"),
    "_softcapped_ce_fwd_kernel": ("fused_ce", "auto"), "FRONTIER_PRESET": ("preset", "frontier"),
    "SMOKE_PRESET": ("preset", "smoke"),
}


def top_names(tree):
    """Names bound by module-level statements (inside module-level if/try blocks too)."""
    names = set()
    for stmt in tree.body:
        for s in [stmt] + getattr(stmt, "body", []) + [x for h in getattr(stmt, "handlers", []) for x in h.body]:
            names |= tg.bound_names(s) or set()
    return names


@pytest.mark.parametrize("env", [{}, {"PRESET": "frontier"}, {"PRESET": "smoke"}, {"PRESET": "minigolf"},
                                 {"PRESET": "minigolf", "TTT_MODE": "lora_phased", "DOC_ATTENTION": "1"},
                                 {"COMPRESSOR": "zstd", "WEIGHT_AVERAGING": "swa", "FLOAT_CHECKPOINT": "auto"}],
                         ids=["record", "frontier", "smoke", "minigolf", "minigolf-lora-doc", "record-zstd-swa"])
def test_every_preset_packs_with_exactly_the_code_its_switches_need(env):
    """Each configuration's copy defines every name it reads (specialised_tree raises otherwise), carries a
    feature's definitions exactly when its switch asks for them."""
    cfg = tg.load_config(env)
    switches = tg.pack_switches(cfg)
    names = top_names(tg.specialised_tree(SOURCE, switches))
    for name, (field, value) in FEATURES.items():
        assert (name in names) == (getattr(cfg, field) == value), (name, field, getattr(cfg, field))
    assert "float_checkpoint" not in switches if env.get("FLOAT_CHECKPOINT") else switches["float_checkpoint"] == ""
    if not env:  # the record's copy is far smaller than the all-paths copy (the frontier's code is the rest)
        assert len(tg.minify_source(SOURCE, switches)) < 0.85 * all_paths_size()


def test_no_string_constant_is_left_inside_an_f_string_field():
    """A string constant inside an f-string's replacement field is unparsed by Python 3.12+ with the outer
    quote, which 3.10/3.11 cannot read: every copy hoists them (hoist_fstring_strings)."""
    for env in ({}, {"PRESET": "frontier"}):
        tree = ast.parse(tg.minify_source(SOURCE, tg.pack_switches(tg.load_config(env))))
        for field in (n.value for n in ast.walk(tree) if isinstance(n, ast.FormattedValue)):
            assert not any(isinstance(n, (ast.Constant, ast.JoinedStr)) and isinstance(getattr(n, "value", None), str)
                           for n in ast.walk(field)), ast.unparse(field)


@functools.lru_cache(maxsize=None)
def all_paths_size():
    """Length of the minified copy that keeps every code path (no switches fixed)."""
    return len(tg.minify_source(SOURCE))


@pytest.fixture(scope="module")
def record_copy(tmp_path_factory):
    """The record-packed copy: (path, its module namespace executed in-process)."""
    out, _, _ = ph.pack_with_env({}, tmp_path_factory.mktemp("record_copy"))
    return out, run_module(out.read_text(encoding="utf-8"), __name__="packed_record", __file__=str(out))


def test_a_packed_copy_counts_its_bytes_on_disk_even_with_crlf(record_copy, tmp_path):
    """A packed copy counts the bytes of its own file as the run first read it: converted to CRLF line endings
    (a checkout with autocrlf), it counts the longer file, not the LF text Python reads; a later edit of the
    file does not change the count."""
    out, _ = record_copy
    crlf = tmp_path / "train_gpt.py"
    crlf.write_bytes(out.read_bytes().replace(b"\n", b"\r\n"))
    ns = run_module(out.read_text(encoding="utf-8"), __name__="packed_crlf", __file__=str(crlf))
    counted, desc, _ = ns["code_bytes"](ns["load_config"]({}))
    assert counted == crlf.stat().st_size > out.stat().st_size and "running it" in desc
    crlf.write_bytes(out.read_bytes())  # edited during the run: the count stays that of the code that ran
    ns["_CODE_BYTES"].clear()
    assert ns["code_bytes"](ns["load_config"]({}))[0] == counted


def test_stand_ins_raise_a_config_error_naming_what_needs_them(record_copy):
    _, ns = record_copy
    assert ns["PACKED"]["preset"] == "record" and ns["PACKED"]["compressor"] == "brotli"
    cases = [(lambda: ns["decode_pergroup"](b"", "x.ptz"), "COMPRESSOR"),
             (lambda: ns["TritonSoftcappedCE"].apply(None, None, 30.0), "FUSED_CE"),
             (lambda: ns["low_rank_delta"](None, None), "TTT_MODE"),
             (lambda: ns["Block"].forward_lanes(None), "PARALLEL_LANES"),
             (lambda: ns["pack_source"]("", {}), "development only")]
    assert "build_default_data" not in ns  # only the smoke and mini-golf presets build data
    for call, need in cases:
        with pytest.raises(ns["ConfigError"], match=need):
            call()


def test_a_packed_copy_refuses_settings_it_was_not_built_for(record_copy, tmp_path):
    out, _ = record_copy
    for env, name in (({"SMEAR_GATE": "1"}, "SMEAR_GATE"), ({"PRESET": "smoke"}, "PRESET"),
                      ({"TTT_MODE": "lora_phased"}, "TTT_MODE"), ({"EXPORT_FROM": "x.pt"}, "EXPORT_FROM")):
        proc = ph.conftest_run_script(dict(env, DRY_RUN="1"), tmp_path, script=out, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert re.search(rf"{name}=.*packed copy was built for {name}=.*python3 train_gpt.py pack", proc.stderr), \
            proc.stderr[-2000:]


def test_a_packed_copy_defaults_to_the_switches_it_was_built_for(tmp_path):
    """A copy packed for PRESET=smoke TTT_MODE=lora_phased runs that configuration with no environment."""
    out, _, _ = ph.pack_with_env({"PRESET": "smoke", "TTT_MODE": "lora_phased"}, tmp_path / "copy")
    ph.run_script(out, {"DRY_RUN": "1", "RUN_ID": "defaults", "LOG_DIR": tmp_path}, cwd=tmp_path)
    log = (tmp_path / "defaults.txt").read_text()
    assert re.search(r"^  preset: smoke$", log, re.M) and re.search(r"^  ttt_mode: lora_phased$", log, re.M)


def test_the_packed_file_is_ascii_without_carriage_returns(record_copy):
    out, _ = record_copy
    data = out.read_bytes()
    assert data.startswith(tg.PACK_STUB_PREFIX.encode()) and max(data) < 128 and 13 not in data and 0 not in data
    assert os.path.getsize(out) == len(data.decode("utf-8").encode("utf-8"))
