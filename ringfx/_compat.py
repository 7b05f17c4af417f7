"""The private torch symbols ringfx needs, reached in this one file.

A torch upgrade that moves one of them should touch only this module; where torch has a
public spelling (``torch.compiler.reset``, ``torch.library.custom_op``,
``torch.utils.checkpoint``) ringfx uses that instead. Dynamo modules are imported inside
the functions that need them, so that ``import ringfx`` does not load dynamo.

The block kernels call aten's own fused attention ops, which return the log-sum-exp the
ring merges with (``SDPA_KERNELS``: private ``torch.ops.aten._scaled_dot_product_*``
overloads; ``runtime/kernels.py`` wraps each in a kernel class).
"""

from __future__ import annotations

import contextlib
import datetime
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as _pytree
from torch._ops import HigherOrderOperator, OpOverload

__all__ = ["HigherOrderOperator", "OpOverload", "SDPA_BINDING", "SDPA_KERNELS", "backend_compiler_failed", "dynamo_code_cache",
           "dynamo_input_example", "dynamo_input_source", "fail_past_recompile_limit", "inductor_compile",
           "lookup_backend", "process_group_timeout", "recompile_limit_hit", "resolve_process_group", "tree_flatten",
           "tree_map", "TorchDispatchMode", "autograd_inside_op", "recompile_limit"]

# The C binding behind F.scaled_dot_product_attention: dynamo records calls with this target.
SDPA_BINDING = torch._C._nn.scaled_dot_product_attention

# torch's fused attention kernels, forward (out, log-sum-exp, ...) and backward, by name.
_ATEN = torch.ops.aten
SDPA_KERNELS = SimpleNamespace(
    cpu_flash=_ATEN._scaled_dot_product_flash_attention_for_cpu,
    cpu_flash_backward=_ATEN._scaled_dot_product_flash_attention_for_cpu_backward,
    cudnn=_ATEN._scaled_dot_product_cudnn_attention,
    cudnn_backward=_ATEN._scaled_dot_product_cudnn_attention_backward,
    flash=_ATEN._scaled_dot_product_flash_attention,
    flash_backward=_ATEN._scaled_dot_product_flash_attention_backward,
    efficient=_ATEN._scaled_dot_product_efficient_attention,
    efficient_backward=_ATEN._scaled_dot_product_efficient_attention_backward,
)

# torch 2.13 has no public pytree module.
tree_map = _pytree.tree_map
tree_flatten = _pytree.tree_flatten

# The dispatch-level mode the planner's simulator records every op with.
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


def tracing_tensors() -> bool:
    """Whether a dispatch mode is active (fake, functional or proxy tensors while a graph is
    traced; a runtime check mode of AOTAutograd): tensors made now must not be cached."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def dynamo_input_source(placeholder: torch.fx.Node) -> Optional[str]:
    """Dynamo's name for where a graph input came from (``L['x']``,
    ``L['self']._buffers['bias']``), from the ``GraphArg`` it records on the placeholder;
    None for other tracers."""
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    return name() if callable(name) else name


def dynamo_input_example(placeholder: torch.fx.Node) -> Any:
    """The concrete value behind a dynamo placeholder (a parameter, buffer or the example
    input of this compilation), or None: another tracer's placeholder, or an example that
    was freed (dynamo holds example tensors weakly and asserts when one is gone)."""
    grapharg = placeholder.meta.get("grapharg")
    if grapharg is None:
        return None
    try:
        return grapharg.example
    except AssertionError:  # "TensorWeakRef expired unexpectedly"
        return None


def fail_past_recompile_limit(limit: int) -> contextlib.AbstractContextManager:
    """Dynamo raises (``recompile_limit_hit()``) instead of running a frame uncompiled once it
    has been compiled ``limit`` times."""
    import torch._dynamo

    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=limit)


def recompile_limit(limit: int) -> contextlib.AbstractContextManager:
    """Dynamo compiles a frame up to ``limit`` times (then runs it uncompiled, or raises
    under fullgraph), whatever limit an enclosing ``fail_past_recompile_limit`` set."""
    import torch._dynamo

    return torch._dynamo.config.patch(recompile_limit=limit)


def recompile_limit_hit() -> type[Exception]:
    """The exception ``fail_past_recompile_limit`` makes dynamo raise."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    return FailOnRecompileLimitHit


def backend_compiler_failed() -> type[Exception]:
    """What dynamo wraps a backend's exception in (the backend's own one is its
    ``inner_exception``)."""
    from torch._dynamo.exc import BackendCompilerFailed

    return BackendCompilerFailed


def inductor_compile(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """Inductor as an inner compiler of a dynamo backend."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def lookup_backend(name: str) -> Callable:
    """The dynamo backend registered as ``name`` (``"aot_eager"``, ...)."""
    from torch._dynamo.backends.registry import lookup_backend as lookup

    return lookup(name)


def dynamo_code_cache() -> Any:
    """Dynamo's per-code-object cache of compiled entries, for ``ringfx.capture_once``:
    ``compile_lock``, ``input_codes`` (weak references to every code object dynamo saw),
    ``entries(code)``, ``reset_code(code)``, ``cached_backends`` (backends by id) and
    ``deleted_guard(reason)`` (the guard manager of an invalidated entry)."""
    from torch._C._dynamo.eval_frame import reset_code
    from torch._dynamo import convert_frame
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list, cached_backends
    from torch._dynamo.guards import DeletedGuardManagerWrapper

    return SimpleNamespace(compile_lock=convert_frame.compile_lock, input_codes=convert_frame.input_codes,
                           entries=_debug_get_cache_entry_list, reset_code=reset_code,
                           cached_backends=cached_backends, deleted_guard=DeletedGuardManagerWrapper)


def resolve_process_group(name: str):
    """The process group registered under ``name`` (``ProcessGroup.group_name``); a
    RuntimeError when there is none."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def process_group_timeout(group, device: torch.device) -> Optional[datetime.timedelta]:
    """The collective timeout of the backend that serves ``device`` in ``group`` (else of the
    group itself), or None where neither exposes it."""
    candidates = [group]
    try:
        candidates.insert(0, group._get_backend(device))
    except RuntimeError:  # no backend for this device type
        pass
    for obj in candidates:
        t = getattr(getattr(obj, "options", None), "_timeout", None)
        if isinstance(t, datetime.timedelta):
            return t
    return None


def assert_on_device(condition: torch.Tensor, message: str) -> None:
    """Raise ``message`` where ``condition`` (a bool tensor) is False, without a host sync on
    CUDA and traceable by the compilers (``torch._assert_async``)."""
    torch._assert_async(condition, message)


@contextlib.contextmanager
def autograd_inside_op():
    """Autograd recording inside a custom op's implementation, which the dispatcher runs
    below the autograd keys (excluded in thread-local state: ``enable_grad`` alone records
    nothing). The flex block kernel differentiates its own block result this way."""
    keys = torch._C.DispatchKeySet
    autograd = keys(torch._C.DispatchKey.AutogradFunctionality) | keys(torch._C.DispatchKey.AutogradOther) | \
        keys(torch._C.DispatchKey.AutogradNestedTensor)
    exclude = torch._C._dispatch_tls_local_exclude_set() - autograd
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield
