"""ilc.runtime: load a plan and run a Hugging Face model with a PoD-compressed KV cache.

    from ilc.runtime import load_plan
    plan = load_plan("plans/smollm2-135m.yaml")
    model = plan.apply(model)
    out = model.generate(ids, max_new_tokens=256)

Imports torch, transformers and PyYAML only (no networkx: that belongs to the compiler). The modules form layers
whose imports point one way (docs/design.md has the picture): heads, bits, plan (the format; quant: the KV integer
arithmetic) -> selection, slots, cache, static_cache, report (the layout) -> attention_common, reference, replay,
sequence (attention paths) -> kernel_dispatch -> attention (the dispatcher) -> apply (policy, and the functions
behind `Plan.apply` / `Plan.new_cache`).
"""

from .apply import QualityWarning, apply_plan, check_plan_matches, new_cache, remove_plan
from .architectures import SUPPORTED_MODEL_TYPES, UnsupportedModelError, check_supported, model_signature
from .attention import ATTENTION_NAME, pod_attention
from .cache import PoDCache, PoDKeys, PoDLayer
from .heads import BlockKind, HeadKind, HeadSpec, Mode
from .plan import Block, ModelSignature, Plan, PlanError, load_plan, plan_from_dict
from .reference import reference_attention
from .report import CacheReport, cache_report

__all__ = [
    "ATTENTION_NAME", "Block", "BlockKind", "CacheReport", "HeadKind", "HeadSpec", "Mode", "ModelSignature", "Plan",
    "PlanError", "PoDCache", "PoDKeys", "PoDLayer", "QualityWarning",
    "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "apply_plan", "cache_report", "check_plan_matches",
    "check_supported", "load_plan", "model_signature", "new_cache", "plan_from_dict", "pod_attention",
    "reference_attention", "remove_plan",
]
