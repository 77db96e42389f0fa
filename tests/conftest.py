"""Shared fixtures: a tiny random Llama built in code (no downloads) and plan helpers."""

import importlib.util
import os

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from ilc.runtime import Plan, model_signature  # noqa: E402
from ilc.runtime.bits import STREAM_GROUPS, HeadPrecision, Precision  # noqa: E402
from ilc.runtime.heads import HeadKind  # noqa: E402
from ilc.runtime.plan import Block, blocks_from_layers, streaming_block  # noqa: E402

# tests/vllm_plugin/ runs in the vLLM environment (`make test-vllm`); the main environment has no vLLM to run it with
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_plugin"]


def tiny_llama(layers=4, heads=4, kv_heads=2, head_dim=8, vocab=97, max_pos=512, seed=0, init_range=0.02):
    """A random Llama; a larger `init_range` gives peaked attention and next-token distributions."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(initializer_range=init_range,
        vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=max_pos,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


class CharTokenizer:
    """Enough of a tokenizer for calibration and adaptation: characters -> ids below the tiny vocab."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 90) for c in text]}


def make_plan(model, groups, sinks=2, window=4, mode="scores", per_head=None, skip_threshold=None):
    """A plan for `model`: the same `groups` for every KV head, or `per_head` lists of groups."""
    sig = model_signature(model, name="tiny")
    heads = per_head or [groups] * sig.num_kv_heads
    return Plan(model=sig, sinks=sinks, window=window, blocks=tuple(blocks_from_layers(g) for g in heads),
                mode=mode, skip_threshold=skip_threshold)


def served_plan(model, streaming: dict[tuple[int, int], int], sinks=2, **kw) -> Plan:
    """A plan vLLM serves: full heads everywhere except `streaming` {(layer, kv head): window}."""
    base = make_plan(model, [[layer] for layer in range(model.config.num_hidden_layers)], sinks=sinks)
    heads = tuple(tuple(streaming_block(l, streaming[l, h]) if (l, h) in streaming else Block((l,))
                        for l in range(base.num_layers)) for h in range(base.num_kv_heads))
    return Plan(model=base.model, sinks=sinks, window=base.window, blocks=heads, **kw)


def mixed_plan(model, sinks=3, window=5, mode="scores", windows=(2, 4, 7)):
    """5 layers, 3 KV heads: layers 1 and 3 hold all three kinds at once (full, follower, streaming); streaming
    windows `windows` (small: 2, 4 and 7 slots)."""
    base = make_plan(model, [list(range(5))], sinks=sinks, window=window, mode=mode)
    shared = lambda *groups: list(blocks_from_layers(groups))  # noqa: E731
    w_small, w_mid, w_big = windows
    heads = (
        tuple(shared([0, 1, 2]) + [streaming_block(3, w_mid), streaming_block(4, w_small)]),
        tuple(shared([0]) + [streaming_block(1, w_small)] + shared([2, 3, 4])),
        tuple([streaming_block(0, w_big)] + shared([1], [2]) + [streaming_block(3, w_big)] + shared([4])),
    )
    return Plan(model=base.model, sinks=sinks, window=window, blocks=heads, mode=mode)


def quantized(plan, *names, residual=8, group=8, streams: str | None = None) -> Plan:
    """`plan` with its FULL heads stored at the precisions `names` in turn (by layer + KV head), its followers at
    those value bits, its streaming heads at 16 bits (at `streams` where `bits.stream_layout_error` allows)."""
    table = plan.head_table()

    def of(layer, h):
        precision = HeadPrecision.parse(names[(layer + h) % len(names)], group)
        spec = table[layer][h]
        if spec.kind == HeadKind.FULL:
            return precision
        if spec.kind == HeadKind.STREAMING and streams and spec.window >= residual + STREAM_GROUPS * group:
            return HeadPrecision.parse(streams, group)
        return HeadPrecision(16, precision.value_bits if spec.kind == HeadKind.FOLLOWER else 16, group=group)

    heads = tuple(tuple(of(layer, h) for layer in range(plan.num_layers)) for h in range(plan.num_kv_heads))
    return plan.with_options(precision=Precision(heads, residual))


@pytest.fixture
def tiny():
    return tiny_llama()
