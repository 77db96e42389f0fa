"""What KV precision costs per head on SmolLM2, priced like ilc's other options (issue: bits per head).

Records the calibration samples `ilc calibrate smollm2-135m --seq-len 4096` uses (prose + retrieval samples), with
keys and queries, then measures each head's relative output error (`ilc.precision.precision_error`) for K/V bit
widths and key layouts (per token vs per channel over 32 tokens), sinks and a recent residual kept in the model
dtype; beside it, a streaming head's error at the windows calibration offers, at its bytes at 4k. Bytes per token
per head count packed integers plus 16-bit scales and minimums, against 16-bit K + V (256 B at head_dim 64).

Run: python benchmarks/kv_precision.py --out docs/kv-precision.md
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import emit_table
from ilc.attention_stats import sample_rows
from ilc.calibrate import record_calibration
from ilc.data import default_corpus, load_calibration_set, retrieval_samples
from ilc.models import load_model
from ilc.precision import precision_error
from ilc.runtime import load_plan
from ilc.runtime.bits import Axis, HeadPrecision
from ilc.similarity import streaming_error

OPTIONS = [HeadPrecision(8, 8), HeadPrecision(8, 4), HeadPrecision(4, 4), HeadPrecision(4, 4, Axis.CHANNEL),
           HeadPrecision(4, 2), HeadPrecision(4, 2, Axis.CHANNEL), HeadPrecision(2, 2),
           HeadPrecision(2, 2, Axis.CHANNEL)]
WINDOWS = (256, 512, 1024, 2048)


def main(args) -> None:
    started = time.perf_counter()
    plan = load_plan(args.plan)
    sinks = plan.sinks
    model, tok, _ = load_model("smollm2-135m", dtype=torch.float32)
    docs = default_corpus()
    data = load_calibration_set(tok, None, args.seq_len, 8, docs)
    retrieval = retrieval_samples(tok, docs, args.seq_len, 4, 32, 0)
    records = record_calibration(model, data, retrieval, sample_rows(args.seq_len, 32), with_keys=True)
    err = precision_error(records, sinks, args.residual, OPTIONS)
    stream = streaming_error(records, sinks, WINDOWS)  # [Hkv, L, windows]
    d = plan.model.head_dim
    lines = [f"# KV precision per head, SmolLM2-135M, calibration samples at {args.seq_len} tokens", "",
             f"Command: `python benchmarks/kv_precision.py --residual {args.residual}` ({len(records)} samples: "
             f"{len(data.samples)} prose + {len(retrieval)} retrieval; sinks {sinks} and the last {args.residual} "
             f"tokens before each row unquantized; groups of 32; {time.perf_counter() - started:.0f} s).", "",
             "Error: relative change of a head's attention output on the recorded rows (the measure calibration "
             "prices every option with), over the 90 (layer, KV head) pairs. Bytes: K + V per token per head, "
             "scales and minimums included; fp16 is 256 B.", "",
             "| option | bytes / token-head | saved vs fp16 | mean error | median | p90 | max |",
             "|---|---|---|---|---|---|---|"]
    for o in OPTIONS:
        e = err[o.name].ravel()
        b = o.bytes_per_token(d)
        lines.append(f"| {o.name} | {b:.0f} | {1 - b / (4 * d):.1%} | {e.mean():.4f} | {np.median(e):.4f} | "
                     f"{np.quantile(e, 0.9):.4f} | {e.max():.4f} |")
    for k, w in enumerate(WINDOWS):
        e = stream[:, :, k].ravel()
        saved = 1 - min(args.seq_len, sinks + w) / args.seq_len
        lines.append(f"| streaming, window {w} (for comparison) | {256 * (1 - saved):.0f} (at {args.seq_len}) | "
                     f"{saved:.1%} | {e.mean():.4f} | {np.median(e):.4f} | {np.quantile(e, 0.9):.4f} | "
                     f"{e.max():.4f} |")
    token, channel = err["K4V4"].ravel(), err["K4cV4"].ravel()
    lines += ["", f"Keys at 4 bits, per token vs per channel: per channel has the lower error on "
              f"{(channel < token).sum()} of {token.size} heads (mean {channel.mean():.4f} vs {token.mean():.4f}); "
              f"at 2 bits: {(err['K2cV2'].ravel() < err['K2V2'].ravel()).sum()} of {token.size}."]
    emit_table(lines, args.out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default="plans/smollm2-135m.yaml", help="its sinks are used")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--out", default=None)
    main(ap.parse_args())
