"""What one call launches: the aten ops it dispatches (with the bytes of their operands) or, on a GPU, the
kernels the profiler records. The one op counter of the project: the check's launch counts (timing.py) and
the benchmark harness (bench/) both count with it.
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Per aten op dispatched inside the `with` block, views (detach, ...) left out since they launch nothing:
    its name (`names`, in dispatch order), and the bytes of its tensor operands read and of its results
    written (`bytes_read`, `bytes_written`), each tensor counted once per op (an in-place op's tensor is read
    and written). `empty` allocates and moves nothing, so it is named but adds no bytes. A launch and traffic
    tally of the same ops on a GPU, not a cache model."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.bytes_read = 0
        self.bytes_written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        name = str(func.overloadpacket)
        self.names.append(name)
        if not name.startswith("aten.empty"):
            read = {id(t): t for t in pytree.tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)}
            self.bytes_read += sum(t.nbytes for t in read.values())
            self.bytes_written += sum(t.nbytes for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def kernels_per_call(fn, device: torch.device) -> list[str]:
    """The kernels one call of fn launches (after one call to warm up).

    Args:
        fn: a callable taking no arguments.
        device: where fn's tensors live.

    Returns:
        On a GPU, the names of the CUDA kernels the profiler records, Triton ones included, memcpy / memset
        activity left out; on the CPU, the aten ops that compute (OpCounter's names: each one kernel launch
        on a GPU).
    """
    fn()
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                and not e.name.lower().startswith(("memcpy", "memset"))]
    with OpCounter() as counter:
        fn()
    return counter.names
