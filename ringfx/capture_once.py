"""Run a callable once under ``torch.compile`` and leave dynamo's caches as they were.

``ringfx.explain`` captures a model with a backend of its own to look at the graphs. A
``torch.compiler.reset()`` around that would throw away every other compiled model in the
process too (a ``transform``'s result would recompile and report its sites twice), and
plain ``torch.compile`` calls would pile their entries onto the model's code objects
until dynamo's recompile limits stop compiling them. Instead:

* the capture enters through a code object of its own (a fresh copy per call), so the
  model's top frame has no entry of ours, and it gets a recompile region of its own
  (``isolate_recompiles``, where torch has it) so other models' limits are not charged;
* afterwards every code object that only we compiled is cleared (``reset_code``), and
  on a code object another compile also uses (a frame after a graph break in a model
  that is also transformed), our entries are invalidated: they never match again and
  release their graphs, though dynamo keeps counting them towards that code object's
  ``accumulated_recompile_limit``.

The private dynamo symbols this needs come from ``ringfx._compat.dynamo_code_cache``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch

from ._compat import dynamo_code_cache

__all__ = ["capture_once"]

log = logging.getLogger("ringfx.capture_once")


def capture_once(fn: Callable, backend: Callable, args: tuple, kwargs: dict, *, dynamic: bool = False) -> Any:
    """``torch.compile(fn, backend=backend, dynamic=dynamic)(*args, **kwargs)``, then
    remove what that call added to dynamo's caches (every other entry stays)."""

    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    # a new code object (replace() copies it): the capture's top frame is no one else's
    call.__code__ = call.__code__.replace(co_name=f"ringfx_capture_{getattr(fn, '__name__', type(fn).__name__)}")
    options = {"backend": backend, "dynamic": dynamic}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        options["isolate_recompiles"] = True
    try:
        return torch.compile(call, **options)(*args, **kwargs)
    finally:
        _drop_cache_entries(backend)


def _compiled_by(entry, backend: Callable) -> bool:
    return getattr(entry.backend, "compiler_fn", entry.backend) is backend


def _drop_cache_entries(backend: Callable) -> None:
    dynamo = dynamo_code_cache()
    with dynamo.compile_lock:
        for ref in list(dynamo.input_codes.seen):
            code = ref()
            if code is None:
                continue
            entries = dynamo.entries(code)
            ours = [e for e in entries if _compiled_by(e, backend)]
            if not ours:
                continue
            # an entry with no backend is one dynamo (or we) invalidated earlier
            if all(_compiled_by(e, backend) or e.backend is None for e in entries):
                dynamo.reset_code(code)
            else:
                for entry in ours:
                    _invalidate(entry, dynamo.deleted_guard)
        # torch.compile keeps every backend it saw (for reset); ours holds the captured graphs
        for key, seen in list(dynamo.cached_backends.items()):
            if getattr(seen, "compiler_fn", seen) is backend:
                del dynamo.cached_backends[key]


def _invalidate(entry, deleted_guard) -> None:
    """What dynamo does to an entry whose guarded object died: it stays in the list but
    never matches, and drops its compiled code."""
    manager = entry.guard_manager
    extra_state = getattr(manager, "extra_state", None)
    if extra_state is None:  # a torch without this hook: the entry stays (it never matches our next backend)
        log.debug("cannot invalidate dynamo cache entry %s on this torch", entry)
        return
    extra_state.invalidate(entry, deleted_guard("ringfx.explain's capture is done"))
