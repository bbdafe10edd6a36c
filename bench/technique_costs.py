"""Code bytes each frontier technique adds to the packed train_gpt.py.

Every figure is the size of a real packed copy: `python3 train_gpt.py pack` builds each copy for one
configuration's switch values (PACK_SWITCHES) and carries only the code they can run, so a technique costs
the copy packed for PRESET=frontier minus the copy packed for PRESET=frontier with that technique switched
off (its own definitions and its call sites). Document-aware attention is off in the frontier preset: its
cost is the copy with it on minus the frontier copy.

With --time it also measures the training-step cost of the model-side techniques on CPU: the mini-golf
model (vocab 8192, its batch and sequence length, looping on) with every technique on vs the one technique
off, one full Trainer.step (forward, backward, Muon/Adam) on synthetic tokens with a BOS every 64 positions,
best of --repeats, interleaved over --rounds so load drift hits both alike. Not a test: compare only figures
measured back to back on one machine.

    python3 bench/technique_costs.py            # prints a Markdown table
    python3 bench/technique_costs.py --time --json bench/results/technique_costs.json
"""
import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# technique -> the env overrides (PACK_SWITCHES fields) that switch it off on top of PRESET=frontier
# (or, for document-aware attention, on)
TECHNIQUES = {
    "SmearGate + BOS fix": {"SMEAR_GATE": "0"},
    "Sparse attention output gate": {"SPARSE_ATTN_GATE": "0"},
    "Parallel decoder lanes": {"PARALLEL_LANES": "0"},
    "Polar Express NS": {"MUON_NS_COEFFS": "quintic"},
    "Fused CE + LeakyReLU² MLP (Triton)": {"FUSED_CE": "off", "FUSED_MLP": "off"},
    "Document-aware attention": {"DOC_ATTENTION": "1"},
    "LQER asymmetric": {"LQER": "0"},
    "Per-group compression (rANS)": {"COMPRESSOR": "brotli"},
    "CaseOps byte sidecar": {"CASEOPS": "0"},
    "Phased LoRA TTT": {"TTT_MODE": "sgd"},
    "Size fit (issue 8, not a leader technique)": {"SIZE_FIT": "0"},
}
SWITCHED_ON = ("Document-aware attention",)  # measured on minus off (the others: frontier minus off)


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


def packed_size(tg, source, env):
    """Bytes of the copy `python3 train_gpt.py pack` writes for the configuration `env` selects."""
    return len(tg.pack_source(source, tg.pack_switches(tg.load_config(env))).encode("utf-8"))


def measure(path):
    """{technique: packed bytes it adds at PRESET=frontier}, plus the record's, the frontier's and the
    all-paths copy's sizes under '_record', '_frontier' and '_all_paths'."""
    tg = load_train_gpt(path)
    source = Path(path).read_text(encoding="utf-8")
    frontier = packed_size(tg, source, {"PRESET": "frontier"})
    out = {"_record": packed_size(tg, source, {}), "_frontier": frontier,
           "_all_paths": len(tg.pack_source(source).encode("utf-8"))}
    for technique, env in TECHNIQUES.items():
        other = packed_size(tg, source, dict(env, PRESET="frontier"))
        out[technique] = other - frontier if technique in SWITCHED_ON else frontier - other
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
    code = costs["code_bytes"]
    print(f"packed train_gpt.py: {code['_record']:,} bytes for PRESET=record, {code['_frontier']:,} for "
          f"PRESET=frontier, {code['_all_paths']:,} with every code path\n")
    print("| Technique | packed code bytes (frontier copy with it minus without it) |\n|---|---:|")
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
