"""Worker launched by torchrun from tests/test_distributed.py: Muon sharding checks and failure injection."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import train_gpt as tg  # noqa: E402


def digest(model):
    """First 8 bytes of the weights' sha256 as an int64 tensor."""
    return torch.tensor(int(tg.state_checksum(model)[:15], 16), dtype=torch.int64)


def muon_check(cfg, rt):
    """Train a few steps; after each, every rank must hold bit-identical weights; owners hold momentum."""
    train_glob, _, _ = tg.data_paths(cfg)
    model = tg.build_model(cfg, rt)
    trainer = tg.Trainer(cfg, rt, model)
    loader = tg.TrainLoader(cfg, rt, tg.resolve_files(train_glob, "train"))
    start = tg.state_checksum(model)
    for step in range(6):
        trainer.step(loader.next_batch(), step, 1.0, looped=step >= 3)
        mine = digest(model)
        lo, hi = mine.clone(), mine.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise SystemExit(f"rank {rt.rank}: weights differ across ranks after step {step + 1}")
    muon = trainer.optimizers[1]
    owned = sum(1 for p in muon.param_groups[0]["params"] if "momentum_buffer" in muon.state[p])
    expected = len(range(rt.rank, len(muon.param_groups[0]["params"]), rt.world_size))
    if owned != expected:
        raise SystemExit(f"rank {rt.rank}: holds momentum for {owned} matrices, expected {expected}")
    if tg.state_checksum(model) == start:
        raise SystemExit("weights did not change")
    print(f"MUON_OK rank={rt.rank} owned={owned} checksum={tg.state_checksum(model)[:16]}", flush=True)


def fail_check(cfg, rt):
    """Rank 1 raises; rank 0 waits in a collective that can never complete."""
    if rt.rank == 1:
        time.sleep(1.0)
        raise RuntimeError("injected failure on rank 1")
    t = torch.ones(1)
    dist.all_reduce(t)
    time.sleep(300)


if __name__ == "__main__":
    config = tg.load_config()
    runtime = tg.setup_runtime(config)
    {"muon": muon_check, "fail": fail_check}[sys.argv[1]](config, runtime)
    dist.destroy_process_group()
