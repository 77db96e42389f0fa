"""Kernel benchmark: PoD attention (Triton) against dense SDPA, Llama-3.1-8B shapes, measured in one run.

Shapes: 32 layers, 32 query / 8 KV heads, head_dim 128, bf16, batch 1. Plan: the paper's windows (16 sinks +
4080 recent) and blocks of 5 consecutive layers for every KV head (7 blocks: ~34% KV saved at 32k), scores mode.
For each context it times, over all 32 layers of one step:
- decode: dense = SDPA over a preallocated K/V; PoD = the runtime's Triton path on a filled PoDCache;
- prefill: dense = SDPA causal (flash); PoD = anchors via SDPA, followers via the Triton prefill kernel;
and reports ratios, plus decode bytes that must be read / time against the device's measured copy bandwidth.

Run (GPU): python benchmarks/kernel_speed.py --out docs/kernels.md
Run (CPU, no GPU needed): python benchmarks/kernel_speed.py --host --contexts 8192 --out docs/kernels-host.md
  counts what one decode step costs on the host, the same on any device: Triton launches, torch ops, bytes the
  cache update writes, and the Python dispatch time with the kernels stubbed out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from common import emit_table, llama8b_plan
from ilc.runtime.bits import head_bytes
from ilc.runtime.heads import HeadKind


def bench(fn, warmup=3, reps=20):
    import triton

    return triton.testing.do_bench(fn, warmup=warmup * 10, rep=reps * 10, return_mode="median")


def graph_ms(fn):
    """GPU time of `fn` without Python/launch overhead: capture it in a CUDA graph and time the replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def copy_bandwidth(dev) -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device=dev)  # 1 GiB, far larger than L2
    x.random_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms / 1e3)  # bytes read + written per second


def _shape(plan):
    m = plan.model
    return m.num_attention_heads, m.num_kv_heads, m.head_dim


def filled_cache(plan, ctx, dev, dtype):
    from ilc.runtime import PoDCache

    _, hkv, d = _shape(plan)
    cache = PoDCache(plan)
    g = torch.Generator(device=dev).manual_seed(0)
    for layer in range(plan.num_layers):
        k = torch.randn(1, hkv, ctx - 1, d, device=dev, dtype=dtype, generator=g)
        cache.update(k, torch.randn_like(k), layer)
    return cache


def decode_views(cache, plan, dev, dtype, count=None):
    """Append one token per layer; return per-layer (query, view, values) for the timed attention calls.
    `count`: a dispatch mode entered around the cache updates only (not the random inputs)."""
    hq, hkv, d = _shape(plan)
    out = []
    for layer in range(plan.num_layers):
        k = torch.randn(1, hkv, 1, d, device=dev, dtype=dtype)
        v, q = torch.randn_like(k), torch.randn(1, hq, 1, d, device=dev, dtype=dtype)
        with count or contextlib.nullcontext():
            view, values = cache.update(k, v, layer)
        out.append((q, view, values))
    return out


def pod_step(cache, views, scaling):
    from ilc.runtime.kernel_dispatch import pod_attention_triton

    state = cache.state
    for layer, (q, view, values) in enumerate(views):
        if layer in cache.last_reader:
            state.queries[layer] = q
        pod_attention_triton(q, view, values, scaling)
        for a in {a for a in view.layer.anchors if a != layer}:
            if cache.last_reader.get(a) == layer:
                state.queries.pop(a, None)


def decode_bytes(plan, ctx, itemsize=2, reuse=True):
    """Bytes one decode step must read over all layers: dense vs PoD (reuse: scores-mode logits, else keys).
    A quantized FULL head reads its packed integers, scales and 16-bit sinks and residual (`bits.head_bytes`)."""
    m = plan.model
    d, g, hkv = m.head_dim, m.num_attention_heads // m.num_kv_heads, m.num_kv_heads
    dense = plan.num_layers * hkv * ctx * 2 * d * itemsize
    pod = 0
    for layer, row in enumerate(plan.head_table()):
        precisions = plan.layer_precisions(layer)
        for h, spec in enumerate(row):
            prox = min(ctx, plan.sinks + spec.window)
            if spec.kind == HeadKind.FULL and precisions[h].quantized:
                pod += head_bytes(spec, precisions[h], ctx, plan.sinks, d, plan.precision.residual,
                                  dtype_bytes=itemsize)
            elif spec.kind == HeadKind.FULL:
                pod += ctx * 2 * d * itemsize + (ctx * g * 4 if reuse else 0)  # K + V (+ write fp32 logits)
            elif spec.kind == HeadKind.STREAMING:  # its sinks and window, K and V
                pod += prox * 2 * d * itemsize
            else:  # own V, own proximal K, then the anchor's logits (reuse) or the anchor's keys
                pod += ctx * d * itemsize + prox * d * itemsize + (ctx - prox) * (g * 4 if reuse else d * itemsize)
    return dense, pod


def run(contexts, out_path):
    dev, dtype = torch.device("cuda"), torch.bfloat16
    plan = llama8b_plan()
    scaling = 128 ** -0.5
    bw = copy_bandwidth(dev)
    rows = []
    for ctx in contexts:
        torch.cuda.empty_cache()
        # ---- decode, dense baseline: SDPA over K/V of ctx tokens, all 32 layers
        kv = [(torch.randn(1, 8, ctx, 128, device=dev, dtype=dtype), torch.randn(1, 8, ctx, 128, device=dev,
                                                                                dtype=dtype)) for _ in range(32)]
        q1 = torch.randn(1, 32, 1, 128, device=dev, dtype=dtype)
        dense_step = lambda: [F.scaled_dot_product_attention(q1, k, v, enable_gqa=True) for k, v in kv]  # noqa
        dense_dec = bench(dense_step)
        dense_graph = graph_ms(dense_step)
        del kv
        torch.cuda.empty_cache()
        # ---- decode, PoD
        cache = filled_cache(plan, ctx, dev, dtype)
        views = decode_views(cache, plan, dev, dtype)
        pod_dec = bench(lambda: pod_step(cache, views, scaling))
        pod_graph = graph_ms(lambda: pod_step(cache, views, scaling))
        held, dense_bytes_cache = cache.nbytes(), cache.dense_bytes()
        del cache, views
        torch.cuda.empty_cache()
        keys_plan = plan.with_options(mode="keys")  # followers read the anchor's keys: no logits reuse
        cache = filled_cache(keys_plan, ctx, dev, dtype)
        views = decode_views(cache, keys_plan, dev, dtype)
        keys_graph = graph_ms(lambda: pod_step(cache, views, scaling))
        del cache, views
        torch.cuda.empty_cache()
        need_dense, need_pod = decode_bytes(plan, ctx)
        need_keys = decode_bytes(plan, ctx, reuse=False)[1]
        # ---- prefill of ctx tokens for one layer of each kind (anchor layer 0, follower layer 1)
        qp = torch.randn(1, 32, ctx, 128, device=dev, dtype=dtype)
        kp = torch.randn(1, 8, ctx, 128, device=dev, dtype=dtype)
        vp = torch.randn_like(kp)
        dense_pre = bench(lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True),
                          warmup=1, reps=5)
        from ilc.runtime.kernel_dispatch import pod_attention_triton
        from ilc.runtime import PoDCache

        small_plan = plan.with_options(blocks=tuple(_two_layer_blocks(plan) for _ in range(8)))

        def pod_prefill():  # layer 0 anchors, layer 1 follows, for every KV head
            c = PoDCache(small_plan)
            v0, val0 = c.update(kp, vp, 0)
            c.state.queries[0] = qp
            pod_attention_triton(qp, v0, val0, scaling)  # anchor layer: SDPA
            v1, val1 = c.update(kp, vp, 1)
            return pod_attention_triton(qp, v1, val1, scaling)  # follower layer: Triton prefill

        anchor_follower = bench(pod_prefill, warmup=1, reps=5)
        layers = plan.num_layers
        followers_layers = sum(1 for i, a in enumerate(plan.anchor_table()) if a[0] != i)
        anchor_layers = layers - followers_layers
        follower_pre = anchor_follower - dense_pre  # follower layer (incl. its cache update) ~ total - anchor
        pod_pre_model = anchor_layers * dense_pre + followers_layers * follower_pre
        dense_pre_model = layers * dense_pre
        rows.append(dict(
            context=ctx, decode_dense_ms=dense_dec, decode_pod_ms=pod_dec, decode_ratio=pod_dec / dense_dec,
            graph_dense_ms=dense_graph, graph_pod_ms=pod_graph, graph_ratio=pod_graph / dense_graph,
            graph_keys_ms=keys_graph, keys_ratio=keys_graph / dense_graph,
            decode_bytes_dense=need_dense, decode_bytes_pod=need_pod, decode_bytes_keys=need_keys,
            decode_bw_dense=need_dense / (dense_graph / 1e3) / bw, decode_bw_pod=need_pod / (pod_graph / 1e3) / bw,
            decode_bw_keys=need_keys / (keys_graph / 1e3) / bw,
            prefill_dense_layer_ms=dense_pre, prefill_follower_layer_ms=follower_pre,
            prefill_ratio=pod_pre_model / dense_pre_model, follower_vs_sdpa=follower_pre / dense_pre,
            kv_saving=1 - held / dense_bytes_cache,
        ))
        print(json.dumps(rows[-1]), flush=True)
        del qp, kp, vp
    write_table(rows, bw, out_path)


def _two_layer_blocks(plan):
    from ilc.runtime.plan import Block

    return (Block((0, 1)),) + tuple(Block((i,)) for i in range(2, plan.num_layers))


def write_table(rows, bw, out_path):
    dev = torch.cuda.get_device_name()
    lines = [
        f"device: {dev}; measured copy bandwidth {bw / 1e12:.2f} TB/s (read + write); torch {torch.__version__}; "
        "Llama-3.1-8B attention shapes (32 layers, 32/8 heads, d=128, bf16, batch 1); plan: 16 + 4080 proximal "
        "tokens, blocks of 5 layers per KV head, scores mode",
        "",
        "Decode: one step over 32 layers. 'graph' = CUDA-graph replay (GPU time, no Python launch overhead); "
        "'eager' = plain Python calls. BW = bytes that must be read / graph time, as a share of the copy bandwidth. "
        "'keys' = the same plan in keys mode (followers read the anchor's keys, no logits reuse).",
        "",
        "| context | KV saved | dense graph ms | PoD graph ms | ratio | keys-mode ratio | dense BW | PoD BW | "
        "eager dense ms | eager PoD ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['kv_saving']:.1%} | {r['graph_dense_ms']:.3f} | {r['graph_pod_ms']:.3f} | "
            f"{r['graph_ratio']:.2f} | {r['keys_ratio']:.2f} | {r['decode_bw_dense']:.0%} | {r['decode_bw_pod']:.0%} | "
            f"{r['decode_dense_ms']:.3f} | {r['decode_pod_ms']:.3f} |")
    lines += ["", "Prefill of the whole context, per layer: SDPA (flash) vs a follower layer (Triton prefill kernel, "
              "cache update included); model ratio = (anchor layers x SDPA + follower layers x follower) / "
              "(32 x SDPA).", "", "| context | SDPA layer ms | follower layer ms | follower / SDPA | model ratio |",
              "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['prefill_dense_layer_ms']:.2f} | {r['prefill_follower_layer_ms']:.2f} | "
                     f"{r['follower_vs_sdpa']:.2f} | {r['prefill_ratio']:.2f} |")
    emit_table(lines, out_path)


class _StubKernel:
    """Stands in for a Triton kernel: counts launches and runs nothing (host cost only)."""

    def __init__(self, counts, name):
        self.counts, self.name = counts, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return launch


def _stub_kernels(counts):
    """Replace every Triton kernel of ilc.kernels by a counting stub; returns an undo function."""
    import importlib

    from triton.runtime.jit import KernelInterface

    saved = []
    for name in ("ilc.kernels", "ilc.kernels.decode", "ilc.kernels.prefill"):
        module = importlib.import_module(name)
        for attr, obj in list(vars(module).items()):
            if isinstance(obj, KernelInterface):
                saved.append((module, attr, obj))
                setattr(module, attr, _StubKernel(counts, attr))
    return lambda: [setattr(m, a, o) for m, a, o in saved]


_NO_WORK = (torch.ops.aten.lift_fresh.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default)


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops run under it that do work (on a GPU, each one a launch or a copy; views and no-ops are
    not counted) and the bytes they write (new tensors, or a copy's source)."""

    def __init__(self):
        super().__init__()
        self.ops = self.bytes_written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func in _NO_WORK:
            return out
        self.ops += 1
        if func._schema.is_mutable:
            sources = [a for a in list(args[1:]) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            self.bytes_written += max((t.numel() * t.element_size() for t in sources), default=0)
        elif isinstance(out, torch.Tensor):
            self.bytes_written += out.numel() * out.element_size()
        return out


def run_host(contexts, out_path, plan_path=None, steps=20):
    """CPU: the host cost of one decode step (every layer), kernels stubbed out. Default plan: Llama-3.1-8B
    shapes with blocks of 5; `plan_path`: a committed plan (random K/V of its model's shapes)."""
    from ilc.runtime import load_plan

    dev, dtype = torch.device("cpu"), torch.bfloat16
    plan = load_plan(plan_path) if plan_path else llama8b_plan()
    scaling = plan.model.head_dim ** -0.5
    lines = [f"plan: {plan_path or 'Llama-3.1-8B shapes, 16 + 4080, blocks of 5'}; {plan.num_layers} layers", "",
             "| context | Triton launches / step | torch ops / step (views not counted): attention | same: cache update | "
             "bytes written by the cache update / step | host dispatch µs / step (kernels stubbed) |",
             "|---|---|---|---|---|---|"]
    for ctx in contexts:
        cache = filled_cache(plan, ctx, dev, dtype)
        counts: dict = {}
        undo = _stub_kernels(counts)
        try:
            times = []
            for step in range(steps):
                update, attention = _OpCounter(), _OpCounter()
                views = decode_views(cache, plan, dev, dtype, count=update)  # the cache update of every layer
                counts.clear()
                with attention:
                    pod_step(cache, views, scaling)
                per_kernel = dict(counts)
                t = time.perf_counter()
                pod_step(cache, views, scaling)
                times.append(time.perf_counter() - t)
        finally:
            undo()
        launches = sum(per_kernel.values())
        host_us = sorted(times)[len(times) // 2] * 1e6
        row = dict(context=ctx, launches=launches, attention_ops=attention.ops, update_ops=update.ops,
                   update_bytes=update.bytes_written, host_us=host_us, kernels=per_kernel)
        print(json.dumps(row), flush=True)
        lines.append(f"| {ctx} | {launches} | {attention.ops} | {update.ops} | {update.bytes_written / 2**20:.1f} MiB | "
                     f"{host_us:.0f} |")
        del cache
    emit_table(lines, out_path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,16384,32768,65536")
    ap.add_argument("--host", action="store_true", help="CPU: host cost of a decode step (no GPU needed)")
    ap.add_argument("--plan", help="--host: a plan file instead of the Llama-3.1-8B-shaped plan")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.host:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
        run_host([int(c) for c in a.contexts.split(",")], a.out, a.plan)
    else:
        run([int(c) for c in a.contexts.split(",")], a.out)
