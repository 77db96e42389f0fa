"""Memory benchmark: KV bytes a PoD cache holds against a dense cache of the same tokens, measured.

- `--smollm2` (CPU): the committed plan on SmolLM2-135M at 1k / 4k / 8k tokens (prefill + 16 decode steps).
- `--llama8b` (CUDA): a Llama-3.1-8B-shaped model with random weights at 32k tokens, the paper's windows and
  blocks of 5 layers per KV head; also torch.cuda.max_memory_allocated for the whole prefill + decode.
Both run dense and compressed in the same process and print ratios.
"""

from __future__ import annotations

import argparse
import time

import torch


def measure(model, plan, ids, new_tokens: int, label: str):
    from ilc.eval.run import kv_bytes
    from ilc.runtime import remove_plan

    rows = {}
    for name in ("dense", "pod"):
        remove_plan(model)
        if name == "pod":
            plan.apply(model)
        if ids.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
        t = time.perf_counter()
        with torch.no_grad():
            out = model(ids, logits_to_keep=1)
            sync()
            prefill = time.perf_counter() - t
            cache = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(new_tokens):
                out = model(nxt, past_key_values=cache, logits_to_keep=1)
                nxt = out.logits[:, -1:].argmax(-1)
            sync()
        row = dict(tokens=cache.get_seq_length(), kv_bytes=kv_bytes(cache), prefill=prefill,
                   decode=(time.perf_counter() - t) / max(1, new_tokens))
        if ids.is_cuda:
            row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        rows[name] = row
        del out, cache
    remove_plan(model)
    d, p = rows["dense"], rows["pod"]
    line = (f"{label}: {d['tokens']} tokens: KV dense {d['kv_bytes'] / 2**20:.1f} MiB, PoD {p['kv_bytes'] / 2**20:.1f} "
            f"MiB held = {p['kv_bytes'] / d['kv_bytes']:.3f}x ({1 - p['kv_bytes'] / d['kv_bytes']:.1%} saved; plan "
            f"estimate {plan.estimated_saving(p['tokens']):.1%}); prefill {d['prefill']:.2f} s dense vs "
            f"{p['prefill']:.2f} s PoD ({p['prefill'] / d['prefill']:.2f}x), decode {d['decode'] * 1e3:.0f} vs "
            f"{p['decode'] * 1e3:.0f} ms/token ({p['decode'] / d['decode']:.2f}x)")
    if "peak_bytes" in d:
        line += (f"; peak allocated during prefill+decode: dense {d['peak_bytes'] / 2**30:.2f} GiB, PoD "
                 f"{p['peak_bytes'] / 2**30:.2f} GiB")
    print(line, flush=True)
    return line


def smollm2(plan_path: str, lengths: list[int]) -> list[str]:
    from ilc.models import load_model
    from ilc.runtime import load_plan

    model, tok, _ = load_model("smollm2-135m")
    plan = load_plan(plan_path)
    torch.manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(100, 20000, (1, n - 16))
        out.append(measure(model, plan, ids, 16, f"SmolLM2-135M fp32 CPU, plan {plan_path}"))
    return out


def llama8b(context: int, new_tokens: int = 8) -> list[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from common import llama8b_plan

    from ilc.runtime import model_signature

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    plan = llama8b_plan(model_signature(model, "llama-3.1-8b-shape (random weights)"))
    ids = torch.randint(0, 128000, (1, context - new_tokens), device="cuda")
    return [measure(model, plan, ids, new_tokens, "Llama-3.1-8B shape, bf16, H100, blocks of 5, 16+4080 window")]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--plan", default="plans/smollm2-135m-pod.yaml")
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--llama8b", action="store_true")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--out")
    a = ap.parse_args()
    lines = []
    if a.smollm2:
        lines += smollm2(a.plan, [int(x) for x in a.lengths.split(",")])
    if a.llama8b:
        lines += llama8b(a.context)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n")
