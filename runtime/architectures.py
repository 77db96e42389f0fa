"""Which models the runtime can compress, and how a model is identified against a plan.

The runtime hands the attention function a split view of the cache through the value that
``past_key_values.update`` returns. That only works for models whose attention layer passes that value
straight to the attention interface, with keys cached after RoPE. The allow-list below names the
model types whose code was checked to do exactly that; any other model fails loudly.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .heads import short_digest
from .plan import ModelSignature

# model_type -> note. Each passes `cache.update(k, v, layer_idx)`'s result to `ALL_ATTENTION_FUNCTIONS[...]`.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama 2/3/3.1/3.2, SmolLM2, TinyLlama",
    "mistral": "Mistral (full attention only)",
    "qwen2": "Qwen2 / Qwen2.5 (full attention only)",
    "qwen3": "Qwen3 dense (full attention only)",
}


class UnsupportedModelError(ValueError):
    """The model's architecture or settings cannot run a PoD-compressed cache."""


def supported_list() -> str:
    return ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_supported(config) -> None:
    """Raise `UnsupportedModelError` unless `config` describes a rotary GQA/MHA decoder we support."""
    cfg = text_config(config)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported. ilc compresses rotary GQA/MHA decoders whose attention "
            f"passes the cache's output straight to the attention function: {supported_list()}."
        )
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(
            f"{model_type} config has layer types {sorted(set(layer_types))}; ilc supports full-attention layers only"
        )
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", window is not None)
    if window is not None and uses_window and window < getattr(cfg, "max_position_embeddings", 0):
        raise UnsupportedModelError(f"{model_type} config uses sliding-window attention ({window}); not supported")


def head_dim(config) -> int:
    cfg = text_config(config)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


SHAPE_FIELDS = ("model_type", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim")


def config_shape(config) -> dict:
    """The shape fields of `ModelSignature` (SHAPE_FIELDS) read from a model config."""
    cfg = text_config(config)
    return dict(model_type=cfg.model_type, num_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads,
                num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim=head_dim(cfg))


def model_signature(model, name: str | None = None) -> ModelSignature:
    """The identity a plan records and `Plan.apply` checks."""
    cfg = text_config(model.config)
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return ModelSignature(
        name=name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        architecture=archs[0],
        **config_shape(model.config),
        max_context=getattr(cfg, "max_position_embeddings", 0) or 0,
        config_fingerprint=config_fingerprint(model.config),
        weights_fingerprint=weights_fingerprint(model),
    )


def config_mismatch(want: ModelSignature, config) -> str | None:
    """Why a model with `config` is not the model `want` describes (a shape, then the config fingerprint), in
    words; None when it is."""
    have = config_shape(config)
    for field in SHAPE_FIELDS:
        if have[field] != getattr(want, field):
            return f"{field} is {have[field]}, the plan expects {getattr(want, field)}"
    if (fingerprint := config_fingerprint(config)) != want.config_fingerprint:
        return f"config fingerprint {fingerprint} != {want.config_fingerprint}"
    return None


def config_fingerprint(config) -> str:
    """A digest of the config fields that decide KV-cache shapes and attention numerics."""
    text = text_config(config)
    keys = (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "vocab_size", "rope_theta", "rope_parameters", "rope_scaling",
        "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    )
    picked = {k: getattr(text, k, None) for k in keys}
    return short_digest(json.dumps(picked, sort_keys=True, default=str).encode())


def weights_fingerprint(model) -> str:
    """A cheap digest of a few weight slices: tells a base model from its fine-tune with the same config."""
    return weights_digest(model.get_input_embeddings().weight, list(model.parameters())[-1])


def weights_digest(embedding: torch.Tensor, last: torch.Tensor) -> str:
    """`weights_fingerprint` from its two tensors: the input embedding [vocab, hidden] and the model's last
    parameter as transformers lists it (a tied Llama: the final norm; untied: the LM head). Slices are rounded to
    bfloat16 first, so loading the same checkpoint in another dtype gives the same digest."""
    h = hashlib.sha256()
    for t in (embedding[:8, :64], last.reshape(-1)[:512]):
        h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return short_digest(h)
