"""A conversion cache for GGUF files.

transformers reads a ``.gguf`` by parsing its metadata three times (config,
tokenizer, weights) and dequantising every tensor: 15 s for SmolLM2-135M and 45 s
for Gemma 3 270M on two cores. The result is the same every time, so lmatlas keeps
it as an ordinary Hugging Face directory (``config.json``, ``tokenizer.json``,
float32 ``model.safetensors``: no pickles) keyed by the GGUF file's SHA-256 and the
transformers version, and loads from there afterwards (about a second).

The directory is ``$LMATLAS_CACHE/gguf/<sha256[:16]>-tf<version>/``
(``$LMATLAS_CACHE`` defaults to ``~/.cache/lmatlas``). It is written to a temporary
sibling and renamed into place, so an interrupted conversion leaves nothing that
looks complete. ``LMATLAS_GGUF_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import transformers

COMPLETE_MARKER = "lmatlas-complete"


def cache_root() -> Path:
    return Path(os.environ.get("LMATLAS_CACHE", Path.home() / ".cache" / "lmatlas")).expanduser()


def enabled() -> bool:
    return os.environ.get("LMATLAS_GGUF_CACHE", "1") not in ("0", "false", "no", "")


def cache_dir(sha256: str) -> Path:
    return cache_root() / "gguf" / f"{sha256[:16]}-tf{transformers.__version__}"


def cached(sha256: str) -> Path | None:
    """The converted directory for a GGUF file's hash, if a complete one exists."""
    path = cache_dir(sha256)
    return path if (path / COMPLETE_MARKER).is_file() else None


def store(sha256: str, hf_model, tokenizer) -> Path | None:
    """Save a freshly converted model (float32 weights) and tokenizer; ``None`` if it could not be written."""
    final = cache_dir(sha256)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
        # GGUF tensors are dequantised on load: the "gguf quantizer" is only a marker, which
        # save_pretrained refuses. Lift it (and the config's marker) while saving.
        config, quantizer = hf_model.config, getattr(hf_model, "hf_quantizer", None)
        quantization = getattr(config, "quantization_config", None)
        try:
            hf_model.hf_quantizer = None
            if quantization is not None:
                del config.quantization_config
            hf_model.save_pretrained(staging, safe_serialization=True)
        finally:
            hf_model.hf_quantizer = quantizer
            if quantization is not None:
                config.quantization_config = quantization
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(sha256 + "\n")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        return final
    except OSError:
        shutil.rmtree(locals().get("staging", final.parent / "__none__"), ignore_errors=True)
        return None
