"""The vLLM entry points: `register()` (run by vLLM in every process through the `vllm.general_plugins` entry
point) and `engine_args(plan)`, the keyword arguments of `vllm.LLM` / `EngineArgs` that serve a plan."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig
from vllm import ModelRegistry

from ..architectures import config_mismatch
from ..plan import Plan, PlanError, load_plan
from .layout import serving_layout
from .model import ARCHITECTURE, PLAN_KEY, IlcLlamaForCausalLM
from .spec import register_spec

SERVED_ARCHITECTURES = ("LlamaForCausalLM",)  # what IlcLlamaForCausalLM rewrites
# vLLM settings a plan serves best with, unless given: the smallest CPU block (a streaming head holds its sink block
# and the blocks its window touches), and prefill chunks of 256 tokens (vLLM sizes a windowed group for its window
# plus the tokens in flight: 4096 in flight would count every streaming head as full).
SERVING_DEFAULTS = dict(block_size=32, max_num_batched_tokens=256)


def register() -> None:
    """Add ilc's model and cache spec to vLLM (idempotent)."""
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, IlcLlamaForCausalLM)
    register_spec()


def engine_args(plan: str | Path, model: str | Path, tensor_parallel_size: int = 1, **overrides) -> dict:
    """Keyword arguments for `vllm.LLM(...)` serving `plan` on the Hugging Face directory `model` (for the
    embedded SmolLM2: `ilc.models.model_directory("smollm2-135m")`). Checks the plan before vLLM starts
    (PlanError, one line): servable kinds, the TP split, the model's architecture and config against the plan.
    `overrides` are passed on (e.g. dtype, max_model_len) and replace SERVING_DEFAULTS."""
    path = Path(plan).resolve()
    check_plan_for_model(load_plan(path), Path(model), tensor_parallel_size, str(plan))
    args = dict(SERVING_DEFAULTS, model=str(model), tensor_parallel_size=tensor_parallel_size,
                enable_prefix_caching=False, hf_overrides={"architectures": [ARCHITECTURE], PLAN_KEY: str(path)})
    args.update(overrides)
    return args


def check_plan_for_model(plan: Plan, directory: Path, tensor_parallel_size: int, where: str) -> None:
    """PlanError (one line) unless the plugin can serve `plan` on the model in `directory`."""
    if not (directory / "config.json").is_file():
        raise PlanError(f"{where}: {directory} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(directory)
    archs = getattr(config, "architectures", None) or []
    if not set(archs) & set(SERVED_ARCHITECTURES):
        raise PlanError(f"{where}: the vLLM plugin serves {', '.join(SERVED_ARCHITECTURES)}; {directory} is "
                        f"{archs or 'of unknown architecture'}")
    if (problem := config_mismatch(plan.model, config)) is not None:
        raise PlanError(f"{where}: plan for {plan.model.name!r} does not fit {directory}: {problem}")
    serving_layout(plan, tensor_parallel_size, where)
