"""ilc.runtime: load a plan and run a Hugging Face model with a PoD-compressed KV cache.

    from ilc.runtime import load_plan
    plan = load_plan("plans/smollm2-135m.yaml")
    model = plan.apply(model)
    out = model.generate(ids, max_new_tokens=256)

Imports torch, transformers and PyYAML only (no networkx: that belongs to the compiler).
"""

from .apply import QualityWarning, apply_plan, check_plan_matches, remove_plan
from .architectures import SUPPORTED_MODEL_TYPES, UnsupportedModelError, check_supported, model_signature
from .attention import ATTENTION_NAME, pod_attention, reference_attention
from .cache import PoDCache, PoDKeys, PoDLayer
from .heads import HeadKind, HeadSpec
from .plan import Block, ModelSignature, Plan, PlanError, load_plan, plan_from_dict
from .report import CacheReport, cache_report

__all__ = [
    "ATTENTION_NAME", "Block", "CacheReport", "HeadKind", "HeadSpec", "ModelSignature", "Plan", "PlanError", "PoDCache",
    "PoDKeys", "PoDLayer", "QualityWarning",
    "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "apply_plan", "cache_report", "check_plan_matches",
    "check_supported", "load_plan", "model_signature", "plan_from_dict", "pod_attention", "reference_attention",
    "remove_plan",
]
