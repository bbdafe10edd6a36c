"""The embedded smoke job: every stage on a fresh machine, learning on real text, inside 5 minutes."""
import re

import pytest

STAGES = [r"^smoke_data: built", r"^warmup:restored weights bit-exactly", r"^layer_loop:enabled",
          r"^(stopping_early: wallclock_cap|warmup:restored)", r"^ema:applying EMA weights", r"^GPTQ:collected",
          r"^Total submission size quantized\+brotli: \d+ bytes", r"^quantized val_loss:",
          r"^quantized_sliding_window val_loss:", r"^quantized_ttt val_loss:",
          r"^legality: positions=\d+ scored_exactly_once=True score_before_update=True$"]


@pytest.mark.slow
def test_smoke_learns_runs_every_stage_within_five_minutes(smoke_run):
    """Final (post-EMA and post-TTT) val_bpb <= 0.6 x step-0 val_bpb, every stage logged, wall time <= 300 s."""
    log, summary, wall = smoke_run
    for pattern in STAGES:
        assert re.search(pattern, log, re.M), pattern
    step0 = float(re.search(r"^0/\d+ val_loss: \S+ val_bpb: (\S+)", log, re.M).group(1))
    final = float(re.search(r"^pre-quantization post-ema val_loss:\S+ val_bpb:(\S+)", log, re.M).group(1))
    assert final <= 0.6 * step0, (step0, final)
    assert summary["results"]["quantized_ttt"]["val_bpb"] <= 0.6 * summary["step0_val_bpb"]
    assert wall <= 300, wall
