"""What else could shrink the packed train_gpt.py: compressed bytes saved by transforms the packer does NOT do,
and what each way of writing the compressed bytes into the stub costs.

Measured on the copy packed for PRESET=record (what a record submission ships). Each transform figure is
brotli-11 bytes of the minified source (what `python3 train_gpt.py pack` compresses) minus the same after the
transform. The last rows compress the same text with other compressors a stub could call. The transforms are
measured, never shipped: shortening error messages or module-level names would
make the shipped file harder to review and its tracebacks unreadable.

    python3 bench/pack_study.py
"""
import ast
import base64
import bz2
import lzma
from pathlib import Path

import brotli

from technique_costs import load_train_gpt

ROOT = Path(__file__).resolve().parent.parent


def compressed(text):
    """brotli-11 bytes of `text` with the packer's settings."""
    return len(brotli.compress(text.encode("utf-8"), quality=11, lgwin=24))


class BlankRaiseMessages(ast.NodeTransformer):
    """Every string inside a raise statement replaced by 'E'."""

    def visit_Raise(self, node):
        for n in ast.walk(node):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                n.value = "E"
            if isinstance(n, ast.JoinedStr):
                n.values = [ast.Constant("E")]
        return node


class BlankLongStrings(ast.NodeTransformer):
    """Every string constant longer than 12 characters replaced by 'S' (rough: breaks the program)."""

    def visit_Constant(self, node):
        if isinstance(node.value, str) and len(node.value) > 12:
            node.value = "S"
        return node


def rename_module_defs(tree):
    """Module-level function and class names shortened to _0, _1, ... (references by Name only)."""
    names = {n.name: f"_{i}" for i, n in enumerate(tree.body) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and n.id in names:
            n.id = names[n.id]
        elif isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names:
            n.name = names[n.name]
    return tree


def other_compressors(data):
    """(label, bytes) for the same minified text under other compressors a stub could call: the record's raw
    LZMA2 stream, bzip2, and PPMd (the pyppmd package, not a dependency of this project) when installed."""
    lzma_raw = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0}]
    rows = [("LZMA2 raw, preset 9e, pb=0 (the record's wrapper, tuned)",
             len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=lzma_raw))),
            ("bzip2 -9", len(bz2.compress(data, 9)))]
    try:
        import pyppmd
    except ImportError:
        rows.append(("PPMd (pyppmd not installed: pip install pyppmd to measure)", None))
    else:
        rows.append(("PPMd order 16 (pyppmd; a new dependency)", len(pyppmd.compress(data, max_order=16))))
    return rows


def main():
    import argparse
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no options: --help only
    tg = load_train_gpt(ROOT / "train_gpt.py")
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    switches = tg.pack_switches(tg.load_config({}))
    mini = tg.minify_source(source, switches)
    base = compressed(mini)
    raw = brotli.compress(mini.encode("utf-8"), quality=11, lgwin=24)
    print(f"record copy: minified source {len(mini):,} chars, brotli-11 {base:,} bytes; written as base85 "
          f"{len(base64.b85encode(raw)):,}, as the packer's base-124 digits {len(tg.encode_digits(raw)):,}, "
          f"raw (not valid UTF-8) {len(raw):,}")
    rows = [("error messages in raise statements blanked", BlankRaiseMessages().visit(ast.parse(mini))),
            ("module-level def/class names shortened", rename_module_defs(ast.parse(mini))),
            ("every string > 12 chars blanked (rough; breaks the program)", BlankLongStrings().visit(ast.parse(mini)))]
    again = compressed(tg.minify_source(mini))  # each transform is re-minified (one-space indentation) too
    for label, tree in rows:
        print(f"{label}: {again - compressed(tg.minify_source(ast.unparse(tree))):,} compressed bytes saved")
    for label, size in other_compressors(mini.encode("utf-8")):
        print(f"{label}: " + ("not measured" if size is None else f"{size:,} bytes (brotli-11: {base:,})"))


if __name__ == "__main__":
    main()
