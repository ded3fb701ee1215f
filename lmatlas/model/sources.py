"""Checks on a model source that is neither a file nor a directory: a packaged name or a hub id.

Light on purpose (no torch, no transformers), so that the command line rejects a
mistyped name at once:

* a near-miss of a packaged name (``gemma3-27b``) is answered with "did you mean
  gemma3-270m?" instead of a trip to the hub;
* a hub id that is not in the local Hugging Face cache fails fast when the hub cannot
  be reached (``HF_HUB_OFFLINE`` set, or no TCP connection within 1.5 s), instead of
  retrying for half a minute.
"""

from __future__ import annotations

from lmatlas.errors import ModelFileError
from lmatlas.model.packaged import PACKAGED


def near_packaged(name: str) -> list[str]:
    """Packaged model names close to ``name`` (a typo: ``gemma3-27b`` -> ``gemma3-270m``)."""
    import difflib

    return difflib.get_close_matches(name.lower(), list(PACKAGED), n=2, cutoff=0.6)


def hub_reachable(timeout: float = 1.5) -> bool:
    """False when the Hugging Face hub cannot be used: offline mode, or no connection within ``timeout``."""
    import os
    import socket
    import threading

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    name, _, port = host.partition(":")
    answer: list[bool] = []

    def connect() -> None:  # in a thread: a slow DNS lookup is not bounded by the socket timeout
        try:
            with socket.create_connection((name, int(port or 443)), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(answer and answer[0])


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # a malformed repo id (HFValidationError): nothing cached under it
        return False


def check_hub_source(source: str) -> None:
    """Fail fast on a mistyped packaged name, or a hub id that cannot be fetched (offline, not cached)."""
    close = near_packaged(source) if "/" not in source else []
    if close and not _in_hub_cache(source):
        raise ModelFileError(
            f"Unknown model {source!r}: did you mean {' or '.join(close)}? (packaged models: "
            f"{', '.join(PACKAGED)}; a hub model is owner/name, e.g. HuggingFaceTB/SmolLM2-135M)."
        )
    if _in_hub_cache(source):
        return
    if not hub_reachable():
        packaged = f" Packaged models (no network): {', '.join(PACKAGED)}."
        raise ModelFileError(
            f"Cannot load {source!r}: it is not a local file or directory, it is not in the Hugging Face cache, and "
            f"the hub is unreachable (offline, or HF_HUB_OFFLINE is set). Connect, or pass a local path.{packaged}"
        )
