"""Code bytes each frontier technique adds to the packed train_gpt.py.

For every technique, the module-level definitions that exist only for it are removed from the source, the
rest goes through the packer's own minifier and is compressed as the packer does (brotli-11, base85), and
the difference to the full packed size is reported. Call sites inside shared functions stay, so the figure
is a slight underestimate; the reduced module is only measured, never run.

With --time it also measures the training-step cost of the model-side techniques on CPU: the mini-golf
model (vocab 8192, its batch and sequence length, looping on) with every technique on vs the one technique
off, one full Trainer.step (forward, backward, Muon/Adam) on synthetic tokens with a BOS every 64 positions,
best of --repeats, interleaved over --rounds so load drift hits both alike. Not a test: compare only figures
measured back to back on one machine.

    python3 bench/technique_costs.py            # prints a Markdown table
    python3 bench/technique_costs.py --time --json bench/results/technique_costs.json
"""
import argparse
import ast
import base64
import importlib.util
import json
import sys
import time
from pathlib import Path

import brotli
import torch

ROOT = Path(__file__).resolve().parent.parent

# technique -> module-level names (functions, classes, constants) used by that technique alone
TECHNIQUES = {
    "SmearGate + BOS fix": ["SmearGate"],
    "Sparse attention output gate": ["HeadGate"],
    "Parallel decoder lanes": ["LaneMix"],
    "Fused CE + LeakyReLU² MLP (Triton)": ["TritonSoftcappedCE", "FusedLeakyReluSquare", "leaky_relu_sq_up",
                                           "if triton is not None", "CE_BLOCK_V", "resolve_fused_kernel"],
    "Document-aware attention": ["flash_varlen_attention", "document_index", "document_structure"],
    "LQER asymmetric": ["quantize_asym_groups", "dequantize_asym_groups", "lqer_factors", "add_lqer",
                        "lqer_correction"],
    "Per-group compression (rANS)": ["GROUP_MAGIC", "GROUP_ROLES", "normalize_freqs", "rans_encode",
                                     "rans_decode", "lane_layout", "encode_ints", "encode_group_ints",
                                     "decode_ints", "encode_pergroup", "decode_pergroup"],
    "CaseOps byte sidecar": ["CASEOPS_OPERATORS", "has_caseops_pieces", "SidecarByteCounter", "sidecar_path",
                             "load_validation_bytes"],
    "Phased LoRA TTT": ["lora_target_list", "phase_doc_counts", "LORA_LINEARS", "LORA_ALIASES",
                        "LORA_MAX_BUCKETS", "LORA_GUARD_MIN_BATCHES", "split_documents", "plan_phases",
                        "rank_batches", "lora_window_buckets", "lora_window", "lora_batch_work", "LoraBank",
                        "lora_optimizer", "frozen_parameters", "lora_score_batch", "global_pass_end",
                        "global_chunks", "global_sgd_step", "global_sgd_pass", "make_lora_bank",
                        "eval_ttt_lora_phased", "warm_lora_graphs", "adapter_legality", "low_rank_delta"],
    "Size fit (issue 8, not a leader technique)": ["FIT_MAX_PRUNE_FRACTION", "FIT_MAX_ATTEMPTS", "SizeFitError",
                                                   "prune_plan", "apply_pruning", "level_counts",
                                                   "code_length_bits", "pruned_counts", "prune_count_for",
                                                   "fit_to_size", "sample_sequences", "fit_cost_bpb"],
}


def load_train_gpt(path):
    """Import train_gpt.py as a module without running main."""
    spec = importlib.util.spec_from_file_location("train_gpt_costs", path)
    module = importlib.util.module_from_spec(spec)
    saved, sys.argv = sys.argv, [str(path)]
    try:
        spec.loader.exec_module(module)
    finally:
        sys.argv = saved
    return module


def node_names(node):
    """The names a module-level statement defines ('if <test>' for an if block)."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.If):
        return {"if " + ast.unparse(node.test)}
    return set()


def packed_length(text):
    """Base85 payload bytes the packer would embed for this minified text (the fixed stub cancels out)."""
    return len(base64.b85encode(brotli.compress(text.encode("utf-8"), quality=11, lgwin=24)))


def measure(path):
    """{technique: packed bytes it adds}, plus the full packed size under key '_total'."""
    tg = load_train_gpt(path)
    source = Path(path).read_text(encoding="utf-8")
    tree = ast.parse(source)
    full = packed_length(tg.minify_source(source))
    defined = set().union(*(node_names(n) for n in tree.body))
    out = {"_total": len(tg.pack_source(source))}
    for technique, names in TECHNIQUES.items():
        missing = set(names) - defined
        if missing:
            raise SystemExit(f"technique_costs: {sorted(missing)} not defined at module level in {path}; "
                             f"update TECHNIQUES in {__file__}")
        kept = [n for n in tree.body if not node_names(n) & set(names)]
        reduced = tg.minify_source(ast.unparse(ast.Module(body=kept, type_ignores=[])))
        out[technique] = full - packed_length(reduced)
    return out


# technique -> the env-style override that switches it off on top of PRESET=minigolf (model-side only)
STEP_TIME_OFF = {
    "SmearGate + BOS fix": {"smear_gate": False},
    "Sparse attention output gate": {"sparse_attn_gate": False},
    "Parallel decoder lanes": {"parallel_lanes": False},
    "Polar Express NS": {"muon_ns_coeffs": "quintic"},
    "Document-aware attention (on vs off)": {"doc_attention": True},
}


def step_seconds(tg, overrides, repeats):
    """Best wall seconds of one mini-golf Trainer.step (looped) with `overrides` on the preset."""
    cfg = tg.Hyperparameters(**dict(tg.MINIGOLF_PRESET, preset="minigolf", vocab_size=8192, **overrides))
    rt = tg.Runtime(device=torch.device("cpu"))
    model = tg.build_model(cfg, rt)
    trainer = tg.Trainer(cfg, rt, model)
    gen = torch.Generator().manual_seed(0)
    seqs = cfg.train_batch_tokens // cfg.train_seq_len // cfg.grad_accum_base
    x = torch.randint(2, cfg.vocab_size, (seqs, cfg.train_seq_len + 1), generator=gen)
    x[:, ::64] = tg.BOS_ID
    micro = [(x[:, :-1], x[:, 1:])] * cfg.grad_accum_base
    trainer.step(micro, 10, 1.0, True)  # warmup
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        trainer.step(micro, 10, 1.0, True)
        best = min(best, time.perf_counter() - t)
    return best


def measure_step_times(path, repeats, rounds):
    """{technique: (ms/step with the technique on, ms/step off)}; doc attention is off in the preset."""
    tg = load_train_gpt(path)
    torch.manual_seed(0)
    best = {}
    for _ in range(rounds):
        for name, off in [("_base", {})] + list(STEP_TIME_OFF.items()):
            t = step_seconds(tg, off, repeats)
            best[name] = min(best.get(name, t), t)
    out = {}
    for name in STEP_TIME_OFF:
        on, off = (best[name], best["_base"]) if name.startswith("Document") else (best["_base"], best[name])
        out[name] = (1000 * on, 1000 * off)
    return out


def frontier_params(path):
    """{technique: parameters it adds to the PRESET=frontier model} (frontier vs frontier with it off)."""
    tg = load_train_gpt(path)
    count = {}
    for name, off in [("_base", {})] + [(k, v) for k, v in STEP_TIME_OFF.items() if "muon" not in str(v)
                                         and "doc_attention" not in v]:
        cfg = tg.Hyperparameters(**dict(tg.FRONTIER_PRESET, preset="frontier", **off))
        count[name] = sum(p.numel() for p in tg.GPT(cfg, "sdpa", "off", "off").parameters())
    return {k: count["_base"] - v for k, v in count.items() if k != "_base"} | {"_frontier_total": count["_base"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default=str(ROOT / "train_gpt.py"))
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--time", action="store_true", help="also time one training step per technique on/off")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    costs = {"code_bytes": measure(args.script), "frontier_params_added": frontier_params(args.script),
             "torch_threads": torch.get_num_threads()}
    print(f"packed train_gpt.py: {costs['code_bytes']['_total']:,} bytes\n")
    print("| Technique | packed code bytes (its own definitions) |\n|---|---:|")
    for technique in TECHNIQUES:
        print(f"| {technique} | {costs['code_bytes'][technique]:,} |")
    params = costs["frontier_params_added"]
    print(f"\nparameters added to the PRESET=frontier model ({params['_frontier_total']:,} in all)\n")
    print("| Technique | parameters |\n|---|---:|")
    for technique, n in params.items():
        if not technique.startswith("_"):
            print(f"| {technique} | {n:,} |")
    if args.time:
        times = measure_step_times(args.script, args.repeats, args.rounds)
        costs["step_ms_on_off"] = times
        print(f"\nmini-golf training step on CPU ({torch.get_num_threads()} threads), best of "
              f"{args.repeats} x {args.rounds} rounds\n")
        print("| Technique | ms/step on | ms/step off | on/off |\n|---|---:|---:|---:|")
        for name, (on, off) in times.items():
            print(f"| {name} | {on:.1f} | {off:.1f} | {on / off:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(costs, indent=1) + "\n")


if __name__ == "__main__":
    main()
