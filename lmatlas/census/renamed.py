"""Head labels renamed since atlases were first written (kept free of torch: readers check it on open)."""

from __future__ import annotations

#: ``(old name, new name)`` of every renamed detector. ``streaming`` marked the heads that must keep the
#: full KV cache, the opposite of DuoAttention's "streaming heads"; it is now ``full_context``.
RENAMED: tuple[tuple[str, str], ...] = (("streaming", "full_context"),)
