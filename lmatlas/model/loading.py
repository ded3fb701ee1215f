"""``lmatlas.load``: a hub id, a local directory, a ``.gguf`` file, or the packaged default.

Loading is checked in an order that never leaves a half-loaded model behind: the
source is resolved and validated, then the config is read and checked (a causal
LM of a supported family), and only then are weights and tokenizer loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmatlas.errors import LmatlasError, ModelFileError, NotACausalLMError
from lmatlas.model import gguf_cache
from lmatlas.model.families import spec_for_model_type
from lmatlas.model.handle import Model
from lmatlas.model.packaged import PACKAGED, packaged_path
from lmatlas.model.provenance import sha256_file  # noqa: F401 (re-exported)
from lmatlas.model.sources import check_hub_source

GGUF_MAGIC = b"GGUF"
PACKAGED_DEFAULT_LABEL = "smollm2-135m (packaged default)"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise LmatlasError(f"Unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)} or 'auto'.") from None


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelFileError(
            f"GGUF file not found: {path}. Check the path, or run `lmatlas info` for the default model."
        )
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}): "
            "the file is corrupt or of another format. Re-download it."
        )


def _check_causal(config: Any, source: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    causal_heads = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    not_causal = (
        getattr(config, "is_encoder_decoder", False)
        or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or (architectures and not any(a.endswith(causal_heads) for a in architectures))
    )
    if not_causal:
        arch = ", ".join(architectures) or config.model_type
        raise NotACausalLMError(
            f"{source} is not a causal language model checkpoint ({arch}). lmatlas maps decoder-only "
            "*ForCausalLM models: load the checkpoint's causal-LM variant instead."
        )


def _resolve(source: str | Path | None) -> tuple[str, dict[str, Any], Path | None]:
    """``(name_or_dir, extra from_pretrained kwargs, weights file to hash)``."""
    if source is None or str(source) in PACKAGED:
        path = packaged_path(None if source is None else str(source))
        return str(path.parent), {"gguf_file": path.name}, path
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        _check_gguf(path)
        return str(path.parent), {"gguf_file": path.name}, path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFileError(f"{path} has no config.json: it is not a Hugging Face model directory.")
        try:
            json.loads((path / "config.json").read_text())
        except ValueError as err:
            raise ModelFileError(f"{path / 'config.json'} is not valid JSON ({err}): the file is corrupt.") from None
        shards = sorted(path.glob("*.safetensors"))
        return str(path), {}, shards[0] if shards else None
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise ModelFileError(
            f"Model source not found or not usable: {source}. Pass a hub id, a directory or a .gguf file."
        )
    check_hub_source(str(source))
    return str(source), {}, None


def _check_device(device: str | torch.device | None) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LmatlasError(f"Unknown device {device!r}: use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmatlasError(f"Device {device!r} asked, but no CUDA GPU is visible here: use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LmatlasError(
            f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
            f"CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LmatlasError(f"Device {device!r} asked, but MPS is not available here: use --device cpu.")


def load(
    source: str | Path | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Model:
    """Load a causal LM and map it.

    Args:
        source: a hub id (``"HuggingFaceTB/SmolLM2-135M"``), a local model directory,
            a ``.gguf`` file, a packaged model name (``"smollm2-135m"``, ``"gemma3-270m"``),
            or ``None`` for the packaged default (SmolLM2-135M-Instruct).
        dtype: ``torch.float32`` (default), ``"bfloat16"``, ``"auto"``, ...
        device: where to put the model (default CPU); ignored with ``device_map``.
        device_map: passed to accelerate (``"auto"`` spreads a model over several GPUs).
        revision: hub revision.

    Raises:
        ModelFileError: the source is missing, unreadable or corrupt.
        UnsupportedArchitectureError: the family has no ArchSpec (the message lists those that do).
        NotACausalLMError: the checkpoint is not a decoder-only causal LM.
    """
    _check_device(device)
    name, extra, weights_file = _resolve(source)  # typos and an unreachable hub fail here, before transformers loads
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    label = str(source) if source is not None else PACKAGED_DEFAULT_LABEL
    gguf_sha = sha256_file(weights_file) if "gguf_file" in extra else None
    convert_to_cache = False
    if gguf_sha and gguf_cache.enabled():
        hit = gguf_cache.cached(gguf_sha)
        if hit is not None:
            name, extra = str(hit), {}
        convert_to_cache = hit is None and device_map is None
    common = dict(extra, revision=revision, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(name, **common)
    except LmatlasError:
        raise
    except Exception as err:  # transformers raises many types for a bad source
        raise ModelFileError(f"Could not read a model config from {label}: {err}") from err
    _check_causal(config, label)
    spec_for_model_type(config.model_type)  # unsupported family: fail before loading weights

    want_dtype = _dtype(dtype)
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            name,
            config=config,
            dtype=torch.float32 if convert_to_cache else want_dtype,
            device_map=device_map,
            **common,
        )
        tokenizer = AutoTokenizer.from_pretrained(name, **common)
    except LmatlasError:
        raise
    except Exception as err:
        raise ModelFileError(f"Could not load the weights or tokenizer of {label}: {err}") from err
    if convert_to_cache:
        gguf_cache.store(gguf_sha, hf, tokenizer)
        if isinstance(want_dtype, torch.dtype) and want_dtype != torch.float32:
            hf = hf.to(want_dtype)
    if device_map is None and device is not None:
        hf = hf.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Model.from_hf(
        hf,
        tokenizer,
        source=label,
        file=str(weights_file) if weights_file else None,
        sha256=gguf_sha,
        revision=revision or getattr(config, "_commit_hash", None),
    )
