"""memopt's own kernels against their torch references, forward and backward: the Triton code under Triton's
interpreter (``TRITON_INTERPRET=1``, set by conftest before Triton is imported), and the CPU path that plans run
here; and the fused loss head as a lowering: planned, run, measured, and chosen on a CUDA preset. Tolerance:
fp32, 1e-5 absolute and relative (the kernel sums the logits' matmul and the classes in tiles, eager in one
call)."""

import copy
import os

import pytest
import torch
from conftest import measured_step_peak, steady_step

import memopt
from memopt import examples
from memopt.errors import MemoptError
from memopt.lower.kernels import (
    LSE_BYTES_PER_TOKEN,
    compress,
    linear_cross_entropy,
    linear_cross_entropy_blocks,
    linear_cross_entropy_reference,
    triton_runs,
)

pytest.importorskip("triton", reason="Triton is a dev dependency: pip install -e '.[dev]'")
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def _case(tokens, hidden, classes, *, bias, ignored, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    weight = (torch.randn(classes, hidden, generator=generator) / hidden**0.5).requires_grad_()
    b = torch.randn(classes, generator=generator).requires_grad_() if bias else None
    target = torch.randint(0, classes, (tokens,), generator=generator)
    target[::ignored] = -100
    return x, weight, b, target


def test_the_interpreter_is_on_so_the_triton_kernels_run_on_cpu():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert triton_runs(torch.zeros(1))


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("tokens", "hidden", "classes", "bias"), [(70, 40, 150, True), (16, 16, 16, False),
                                                                   (33, 100, 257, False)])
def test_fused_linear_cross_entropy_equals_eager_forward_and_backward(use_triton, reduction, tokens, hidden,
                                                                      classes, bias):
    x, weight, b, target = _case(tokens, hidden, classes, bias=bias, ignored=5)
    leaves = [t for t in (x, weight, b) if t is not None]
    expected = linear_cross_entropy_reference(x, weight, target, b, reduction=reduction)
    seed = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    expected_grads = torch.autograd.grad(expected, leaves, seed)
    loss = linear_cross_entropy(x, weight, target, b, reduction=reduction, use_triton=use_triton, chunk_tokens=32)
    grads = torch.autograd.grad(loss, leaves, seed)
    torch.testing.assert_close(loss, expected, **TOLERANCE)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, **TOLERANCE)
    # ignored tokens contribute nothing to the inputs' gradient
    assert not grads[0][target == -100].any()


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
def test_every_token_ignored_gives_nan_under_mean_and_zero_under_sum_as_cross_entropy_does(use_triton):
    x, weight, _, target = _case(8, 16, 20, bias=False, ignored=1)
    mean = linear_cross_entropy(x, weight, target, use_triton=use_triton)
    assert torch.isnan(mean) and torch.isnan(linear_cross_entropy_reference(x, weight, target))
    assert linear_cross_entropy(x, weight, target, reduction="sum", use_triton=use_triton).item() == 0.0


def test_tiles_are_chosen_per_shape_within_the_bounds():
    small, large = linear_cross_entropy_blocks(5, 10, 8), linear_cross_entropy_blocks(4096, 50257, 768)
    assert (small.block_m, small.block_v, small.block_k) == (16, 16, 16)
    assert (large.block_m, large.block_v, large.block_k) == (64, 128, 64) and large.num_warps == 8
    assert linear_cross_entropy_blocks(40, 100, 33).block_m == 64 and linear_cross_entropy_blocks(
        40, 100, 33).block_v == 128


def test_bad_shapes_and_reductions_are_refused_with_the_way_out():
    x, weight, _, target = _case(8, 16, 20, bias=False, ignored=3)
    with pytest.raises(MemoptError, match="flatten the tokens"):
        linear_cross_entropy(x[None], weight, target)
    with pytest.raises(MemoptError, match="reduction must be one of"):
        linear_cross_entropy(x, weight, target, reduction="avg")


def _lm():
    workload = examples.gpt2(layers=2, width=64, heads=2, seq=64, batch=2, vocab=2000)
    torch.manual_seed(0)
    return workload, workload.build(), workload.inputs()


def test_a_step_planned_with_the_kernel_trains_like_eager_and_measures_what_its_plan_predicts():
    workload, model, inputs = _lm()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(memopt.BudgetInfeasibleError) as smallest:
        memopt.plan(model, inputs, loss_fn=workload.loss_fn, optimizer=optimizer, chunk_loss="kernel", budget=1)
    budget = smallest.value.minimum
    compiled = memopt.compile(model, budget=budget, loss_fn=workload.loss_fn, optimizer=optimizer,
                              chunk_loss="kernel")
    loss = compiled(**inputs)
    expected = reference(**inputs).loss
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, **TOLERANCE)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOLERANCE, msg=name)
    optimizer.zero_grad(set_to_none=True)
    (head,) = compiled.plan.chunked
    assert head.kernel.startswith("memopt::linear_cross_entropy") and head.kernel in str(compiled.plan.explain())
    assert any("linear_cross_entropy" in str(node.target) for node in compiled.plan.program.graph.graph.nodes)
    step = steady_step(compiled, inputs, optimizer)
    peak = measured_step_peak(compiled.plan, memopt.measure_peak(step))
    assert peak <= budget, f"measured {peak:,} B over the budget {budget:,} B"
    assert abs(peak - compiled.plan.peak_bytes) <= 4096, (peak, compiled.plan.peak_bytes)


def test_on_a_cuda_preset_auto_picks_the_kernel_unless_the_chunked_graph_scores_better():
    workload = examples.gpt2(layers=1, width=64, heads=2, seq=128, batch=2, vocab=8000)
    torch.manual_seed(0)
    model, inputs = workload.build(), workload.inputs()
    optimizer = (torch.optim.AdamW, {"lr": 1e-4})
    eager = memopt.plan(model, inputs, optimizer=optimizer, device="h100", fake=True).peak_bytes
    budget = eager * 3 // 4  # below the traced head's step: its logits have to go
    plan = memopt.plan(model, inputs, optimizer=optimizer, chunk_loss="auto", device="h100", fake=True,
                       budget=budget)
    (head,) = plan.chunked
    assert head.kernel == "memopt::linear_cross_entropy (Triton)", head.reason
    assert head.chunk_bytes == head.rows * LSE_BYTES_PER_TOKEN and plan.peak_bytes <= budget
    assert plan.to_dict()["chunks"][0]["kernel"] == head.kernel
    # the same knob on the CPU runs the chunked graph: the kernel's torch path is no kernel
    cpu = memopt.plan(model, inputs, optimizer=optimizer, chunk_loss="auto", fake=True, budget=budget)
    assert all(not c.kernel for c in cpu.chunked)


@pytest.mark.slow
def test_inductor_runs_a_step_planned_with_the_kernel_within_float_tolerance():
    workload = examples.gpt2(layers=1, width=64, heads=2, seq=64, batch=2, vocab=2000)
    torch.manual_seed(0)
    model, inputs = workload.build(), workload.inputs()
    reference = copy.deepcopy(model)
    compiled = memopt.compile(model, budget="1GB", optimizer=torch.optim.AdamW(model.parameters()),
                              chunk_loss="kernel", backend="inductor")
    loss = compiled(**inputs)
    expected = reference(**inputs).loss
    loss.backward()
    expected.backward()
    assert compiled.plan.chunked[0].kernel
    torch.testing.assert_close(loss, expected, **TOLERANCE)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOLERANCE, msg=name)


@pytest.mark.parametrize("shape", [(1000,), (7, 300), (4, 64)])
def test_int8_packing_under_triton_equals_its_reference_and_errs_at_most_half_a_step(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    x.view(-1)[:compress.BLOCK] = 0  # a block of zeros: scale 0, unpacked to zeros
    payload, scales = compress.pack(x, "int8", use_triton=True)
    expected_payload, expected_scales = compress.pack_reference(x, "int8")
    assert torch.equal(payload, expected_payload) and torch.equal(scales, expected_scales)
    assert payload.numel() + 4 * scales.numel() == compress.packed_bytes(x.numel(), "int8")
    unpacked = compress.unpack(payload, scales, x.shape, x.dtype, "int8", use_triton=True)
    assert torch.equal(unpacked, compress.unpack_reference(payload, scales, list(x.shape), x.dtype))
    step = scales.repeat_interleave(compress.BLOCK)[: x.numel()].view(x.shape)
    assert ((unpacked - x).abs() <= step / 2 * (1 + 1e-6)).all()
    assert not unpacked.view(-1)[: compress.BLOCK].any()


def test_fp8_packing_errs_within_e4m3s_precision():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    payload, scales = compress.pack(x, "fp8")
    assert payload.dtype == torch.float8_e4m3fn
    unpacked = compress.unpack(payload, scales, x.shape, x.dtype, "fp8")
    step = scales.repeat_interleave(compress.BLOCK)[: x.numel()]
    # e4m3 keeps 3 mantissa bits: half a unit in the last place is 1/16 of a value; below its smallest normal
    # (2^-6 of the scale) the spacing is fixed; bfloat16's own rounding on top
    bound = torch.maximum(x.float().abs() / 16, step * 2.0**-10) + x.float().abs() / 128
    assert ((unpacked.float() - x.float()).abs() <= bound).all()


def test_bad_compression_settings_are_refused():
    with pytest.raises(MemoptError, match="one of int8, fp8"):
        compress.pack(torch.ones(4), "int4")
    with pytest.raises(MemoptError, match="power of two"):
        compress.pack(torch.ones(4), "int8", block=100)
    with pytest.raises(MemoptError, match="floating-point"):
        compress.pack(torch.ones(4, dtype=torch.int64), "int8")
