"""part_fast.check.op_count: the one op counter (the check's launch counts and the benchmark harness's op and
traffic counts), on CPU tensors whose ops and bytes are known."""
from __future__ import annotations

import torch

from part_fast import reference
from part_fast.check.inputs import STEP, update_inputs
from part_fast.check.op_count import OpCounter, kernels_per_call


def test_counts_each_computing_op_with_its_operand_bytes():
    a, b = torch.ones(4), torch.ones(4)  # 16 bytes each
    with OpCounter() as counter:
        torch.add(a, b)  # reads a and b, writes 16 bytes
        a.mul(a)  # one tensor read twice is read once
        a.add_(1.0)  # in place: a read and written
    assert counter.names == ["aten.add", "aten.mul", "aten.add_"]
    assert counter.bytes_read == 32 + 16 + 16
    assert counter.bytes_written == 16 + 16 + 16


def test_views_are_not_counted_and_empty_moves_no_bytes():
    a = torch.ones(2, 8)
    with OpCounter() as counter:
        a.view(16)
        a.detach()
        a.t()
        torch.empty(1000)
    assert counter.names == ["aten.empty"]
    assert (counter.bytes_read, counter.bytes_written) == (0, 0)


def test_kernels_per_call_lists_the_release_chain_after_one_warm_up_call():
    x_adv, grad, x_nat, eps = update_inputs((2, 3, 4, 4), 3, torch.device("cpu"))
    calls = []

    def step():
        calls.append(1)
        reference.pgd_step_release(x_adv, grad, x_nat, eps, STEP)

    names = kernels_per_call(step, torch.device("cpu"))
    assert len(calls) == 2  # the first call warms up, the second is counted
    # The released eager chain as bench/README.md's "Launch counts" lists it: -eps is computed twice.
    assert [n.removeprefix("aten.") for n in names] == [
        "sign", "mul", "add", "sub", "gt", "where", "neg", "lt", "neg", "where", "add", "clamp"]
