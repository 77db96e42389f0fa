"""`IlcLlamaForCausalLM`: vLLM's Llama with each layer's attention split into the plan's head groups.

The plan path arrives in the model config (`ilc_plan`, set through `hf_overrides` by `plugin.engine_args` and
`ilc serve`), so every worker process reads the same plan. Checkpoint tensors are permuted while they load
(`layout.permute_checkpoint_tensor`), before vLLM shards them over tensor-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

from ..architectures import config_mismatch, weights_digest
from ..heads import HeadKind
from ..plan import PlanError, load_plan
from .attention import SinkWindowAttention
from .layout import ServingLayout, describe, permute_checkpoint_tensor, serving_layout

logger = init_logger("vllm.ilc")  # under vLLM's logger, so the startup line shows with its own
PLAN_KEY = "ilc_plan"  # the config attribute holding the plan's path
ARCHITECTURE = "IlcLlamaForCausalLM"
LOG_CONTEXT = 4096  # context the startup line prices the plan at


def plan_layout(config, tensor_parallel: int):
    """(plan, layout) named by the model config; PlanError in one line if missing, for another model, or not
    servable."""
    path = getattr(config, PLAN_KEY, None)
    if not path:
        raise PlanError(f"{ARCHITECTURE} needs a plan: pass hf_overrides={{'{PLAN_KEY}': PATH, ...}} "
                        "(ilc.runtime.vllm.plugin.engine_args does) or serve with `ilc serve PLAN`")
    plan = load_plan(path)
    if (problem := config_mismatch(plan.model, config)) is not None:
        raise PlanError(f"{path}: plan for {plan.model.name!r} does not fit this model: {problem}")
    return plan, serving_layout(plan, tensor_parallel, where=str(path))


class IlcLlamaAttention(LlamaAttention):
    """LlamaAttention whose KV heads each run as their own vLLM attention layer `attn<slot>` (with its GQA query
    heads): FULL heads in vLLM's `Attention`, STREAMING heads in `SinkWindowAttention`. One KV head per layer keeps
    every cache page the same size, so vLLM neither pads pages nor pads cache groups. Inputs and outputs as
    LlamaAttention; the checkpoint was permuted so that slot order is the layout's."""

    def __init__(self, *args, layout: ServingLayout, prefix: str = "", cache_config=None, **kwargs):
        super().__init__(*args, prefix=prefix, cache_config=cache_config, **kwargs)
        # replaced by one attention layer per KV head; unregistered so that no cache is made for it
        del self.attn
        get_current_vllm_config().compilation_config.static_forward_context.pop(f"{prefix}.attn")
        layer = int(prefix.split(".")[-2])
        g = layout.queries_per_kv
        heads = []
        for group, kv_heads in layout.layers[layer].local_groups(layout.tensor_parallel):
            for _ in range(kv_heads):
                name = f"{prefix}.attn{len(heads)}"
                if group.kind == HeadKind.FULL:
                    heads.append(Attention(g, self.head_dim, self.scaling, num_kv_heads=1, cache_config=cache_config,
                                           prefix=name))
                else:
                    heads.append(SinkWindowAttention(g, self.head_dim, self.scaling, num_kv_heads=1,
                                                     sinks=layout.sinks, window=group.window,
                                                     cache_config=cache_config, prefix=name))
        self.heads = nn.ModuleList(heads)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        d, g = self.head_dim, self.num_heads // self.num_kv_heads
        outputs = [attn(q[:, i * g * d:(i + 1) * g * d].contiguous(), k[:, i * d:(i + 1) * d].contiguous(),
                        v[:, i * d:(i + 1) * d].contiguous()) for i, attn in enumerate(self.heads)]
        output, _ = self.o_proj(torch.cat(outputs, dim=-1))
        return output


class IlcLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM serving an ilc plan (full and streaming heads); the plan comes from the config."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        if vllm_config.cache_config.enable_prefix_caching:
            raise PlanError("ilc plans with streaming heads cannot use prefix caching (a cached prefix would need "
                            "the blocks the plan frees); pass --no-enable-prefix-caching / enable_prefix_caching=False")
        self.plan, self.layout = plan_layout(config, get_tensor_model_parallel_world_size())
        if get_tensor_model_parallel_rank() == 0:
            logger.info(describe(self.plan, self.layout, min(LOG_CONTEXT, vllm_config.model_config.max_model_len)))
        attention = partial(IlcLlamaAttention, layout=self.layout)
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         layer_type=partial(LlamaDecoderLayer, attn_layer_type=attention))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        seen: dict[str, torch.Tensor] = {}
        loaded = super().load_weights(self._permuted(weights, seen))
        self._check_weights(seen)
        return loaded

    def _permuted(self, weights, seen: dict[str, torch.Tensor]):
        """The checkpoint with attention projections permuted to the layout; keeps the two tensors the weights
        fingerprint reads."""
        for name, tensor in weights:
            if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                seen[name] = tensor[:8].clone() if name.endswith("embed_tokens.weight") else tensor.clone()
            yield name, permute_checkpoint_tensor(self.layout, name, tensor)

    def _check_weights(self, seen: dict[str, torch.Tensor]) -> None:
        """The plan's weights fingerprint, computed from the checkpoint as transformers would (tied Llama: the last
        parameter is the final norm, untied: the LM head)."""
        want = self.plan.model.weights_fingerprint
        last = seen.get("model.norm.weight") if self.config.tie_word_embeddings else seen.get("lm_head.weight")
        embedding = seen.get("model.embed_tokens.weight")
        if not want or embedding is None or last is None:
            return
        if (have := weights_digest(embedding, last)) != want:
            raise PlanError(f"plan for {self.plan.model.name!r} was calibrated on other weights (weights fingerprint "
                            f"{have} != {want})")
