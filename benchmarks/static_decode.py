"""Captured decode: a whole model's decode step with a static cache, dense SDPA vs ilc's static PoD cache.

The model has Llama-3.1-8B attention shapes (32 layers, 32 query / 8 KV heads, head_dim 128, bf16) with random
weights and a tiny MLP (intermediate size 256), so that the step time is mostly attention and the q/k/v/o
projections. The plan: the paper's windows and blocks of 5 layers (`common.llama8b_plan`, ~34% saved at 32k).
For each context and batch it fills both caches by a chunked prefill, then times one decode step:
- eager, and compiled with `torch.compile(mode="reduce-overhead", fullgraph=True)` (CUDA graphs);
- dense: transformers' `StaticCache` + SDPA; PoD: `plan.new_cache(model, max_length=...)` + the Triton decode
  kernel reading the slot count on the device;
and reports the ratio, the bytes each step must read from the cache (`kernels.decode_bytes`) and the achieved
share of the measured copy bandwidth. Prefill per layer against SDPA is in `benchmarks/kernel_speed.py`.

Run (GPU): python benchmarks/static_decode.py --out docs/static-decode.md
  --precisions K16V16,K8V8,K4cV4 adds plans with every head FULL at those precisions (the quantized decode kernel
  reading packed int8 / int4 keys and values): the bytes a step reads against its time; --streams 2048:K4cV4 adds
  one where every other layer's heads stream a 2048-token window, every head at that precision (the kernel's
  quantized streaming path: sinks, then the window's packed groups).
Run (CPU, a correctness smoke test of the script itself, no timing claims): python benchmarks/static_decode.py --smoke
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import emit_table, llama8b_plan


def build_model(layers: int, device, dtype, smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64) if smoke else \
        dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    cfg = LlamaConfig(**shape, intermediate_size=256, num_hidden_layers=layers, vocab_size=1024,
                      max_position_embeddings=131072, rope_theta=500000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def timed(fn, device, reps: int) -> float:
    """Median milliseconds of `fn` (after warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def prefill(model, cache, ids, chunk: int):
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            model(ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)


def step_fn(model, cache, token, pos):
    position_ids = pos[None].expand(token.shape[0], 1)

    def step():
        return model.forward(input_ids=token, past_key_values=cache, cache_position=pos, position_ids=position_ids,
                             use_cache=True, logits_to_keep=1).logits
    return step


def measure(model, make_cache, ctx: int, batch: int, device, reps: int, compile_mode: str | None):
    cache = make_cache(ctx + 8)
    ids = torch.randint(0, 1024, (batch, ctx), device=device)
    prefill(model, cache, ids, chunk=8192)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.tensor([ctx], device=device)  # every timed step writes the same slot: the cache does not grow
    step = step_fn(model, cache, token, pos)
    with torch.no_grad():
        eager = timed(step, device, reps)
        graph = None
        if compile_mode:
            torch._dynamo.reset()
            compiled = torch.compile(step, mode=compile_mode, fullgraph=True)
            graph = timed(compiled, device, reps)
    return eager, graph


def copy_bandwidth(device) -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), device, 10)
    return 2 * x.numel() / (ms / 1e3)


def main(args):
    from transformers import StaticCache

    from ilc.runtime import model_signature, remove_plan
    from ilc.runtime.bits import HeadPrecision, Precision, uniform_precision
    from ilc.runtime.plan import Block, streaming_block
    from kernel_speed import decode_bytes

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = build_model(args.layers, device, dtype, args.smoke)
    sig = model_signature(model, name="llama-3.1-8b-attention-shape")
    sinks, window = (4, 16) if args.smoke else (16, 4080)
    plans = {"PoD blocks of 5": llama8b_plan(sig, sinks=sinks, window=window)}
    for name in filter(None, args.precisions.split(",")):  # every head FULL (the quantized kernel has no followers)
        every_head = llama8b_plan(sig, block=1, sinks=sinks, window=window)
        plans[f"every head {name}"] = every_head.with_options(precision=uniform_precision(
            every_head.head_table(), HeadPrecision.parse(name), residual=16 if args.smoke else 128))
    if args.streams:  # every other layer streaming, everything at one precision
        window_text, name = args.streams.split(":")
        base = llama8b_plan(sig, block=1, sinks=sinks, window=window)
        n = sig.num_layers
        blocks = tuple(tuple(streaming_block(layer, int(window_text)) if layer % 2 else Block((layer,))
                             for layer in range(n)) for _ in range(sig.num_kv_heads))
        precision = HeadPrecision.parse(name)
        plans[f"odd layers streaming {window_text}, all {name}"] = base.with_options(
            blocks=blocks, precision=Precision(((precision,) * n,) * sig.num_kv_heads, 16 if args.smoke else 128))
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    compile_mode = None if args.smoke else "reduce-overhead"
    bw = None if args.smoke else copy_bandwidth(device)
    rows = []
    for ctx in contexts:
        for batch in batches:
            dense_gib = 2 * sig.num_layers * sig.num_kv_heads * ctx * sig.head_dim * batch * dtype.itemsize / 2**30
            if dense_gib > args.max_cache_gib:
                rows.append(dict(context=ctx, batch=batch, skipped=f"dense cache {dense_gib:.0f} GiB"))
                continue
            dense = measure(model, lambda n: StaticCache(config=model.config, max_cache_len=n), ctx, batch, device,
                            args.reps, compile_mode)
            for label, plan in plans.items():  # each beside the dense step measured in the same run
                plan.apply(model)
                pod = measure(model, lambda n: plan.new_cache(model, max_length=n), ctx, batch, device, args.reps,
                              compile_mode)
                remove_plan(model)
                need_dense, need_pod = decode_bytes(plan, ctx)
                need_dense, need_pod = need_dense * batch, need_pod * batch
                row = dict(plan=label, context=ctx, batch=batch, dense_eager_ms=dense[0], pod_eager_ms=pod[0],
                           eager_ratio=pod[0] / dense[0], bytes_dense=need_dense, bytes_pod=need_pod)
                if dense[1] is not None:
                    row.update(dense_graph_ms=dense[1], pod_graph_ms=pod[1], graph_ratio=pod[1] / dense[1],
                               bw_dense=need_dense / (dense[1] / 1e3) / bw, bw_pod=need_pod / (pod[1] / 1e3) / bw)
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache() if device.type == "cuda" else None
    write(rows, bw, args.out, args.layers)


def write(rows, bw, out, layers):
    lines = [f"One decode step of a {layers}-layer model with Llama-3.1-8B attention shapes (bf16, random weights, "
             "tiny MLP), static caches. Graph = `torch.compile(mode='reduce-overhead', fullgraph=True)`. Bytes: what "
             "the step must read from the KV cache (PoD: scores mode, followers read the anchor's logits)."
             + (f" Copy bandwidth measured: {bw / 1e12:.2f} TB/s." if bw else ""), "",
             "| plan | context | batch | dense eager ms | PoD eager ms | ratio | dense graph ms | PoD graph ms | ratio | "
             "cache MiB read dense / PoD | bandwidth dense / PoD |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| | {r['context']} | {r['batch']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        g = (f"{r['dense_graph_ms']:.2f} | {r['pod_graph_ms']:.2f} | {r['graph_ratio']:.2f}x"
             if "graph_ratio" in r else "– | – | –")
        b = f"{r['bw_dense']:.0%} / {r['bw_pod']:.0%}" if "bw_pod" in r else "–"
        lines.append(f"| {r['plan']} | {r['context']} | {r['batch']} | {r['dense_eager_ms']:.2f} | {r['pod_eager_ms']:.2f} | "
                     f"{r['eager_ratio']:.2f}x | {g} | {r['bytes_dense'] / 2**20:.0f} / {r['bytes_pod'] / 2**20:.0f} "
                     f"| {b} |")
    emit_table(lines, out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="8192,32768,65536")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-cache-gib", type=float, default=40.0, help="skip settings whose dense cache is larger")
    ap.add_argument("--precisions", default="", help="also plans with every head FULL at these precisions, e.g. "
                    "K16V16,K8V8,K4cV4 (fp16 vs int8 vs int4 reads)")
    ap.add_argument("--streams", default="", help="also a plan whose odd layers stream WINDOW tokens, every head at "
                    "PRECISION, as WINDOW:PRECISION, e.g. 2048:K4cV4")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, no compile, to check the script runs")
    ap.add_argument("--out")
    main(ap.parse_args())
