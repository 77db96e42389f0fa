"""What the benchmark scripts share: the Llama-3.1-8B-shaped plan of the GPU benchmarks, and table output."""

from __future__ import annotations

from pathlib import Path


def llama8b_plan(signature=None, block: int = 5, sinks: int = 16, window: int = 4080):
    """The paper's windows and blocks of `block` consecutive layers for every KV head, on Llama-3.1-8B shapes
    (32 layers, 32 / 8 heads, head_dim 128); `signature`: that of a real model of those shapes, to apply it."""
    from ilc.runtime import Plan
    from ilc.runtime.plan import ModelSignature, blocks_from_layers

    sig = signature or ModelSignature("llama-3.1-8b-shape", "LlamaForCausalLM", "llama", 32, 32, 8, 128, 131072,
                                      "sha256:benchmark")
    n = sig.num_layers
    groups = [list(range(a, min(n, a + block))) for a in range(0, n, block)]
    return Plan(model=sig, sinks=sinks, window=window,
                blocks=tuple(blocks_from_layers(groups) for _ in range(sig.num_kv_heads)))


def emit_table(lines: list[str], out: str | Path | None) -> None:
    """Print a result table, and write it to `out` when given."""
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
