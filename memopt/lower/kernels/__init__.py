"""memopt's own kernels: each one a Triton kernel for CUDA with a torch reference of the same math.

A kernel runs its Triton code on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1`` (Triton's interpreter,
how the tests check it on CPU); elsewhere its torch reference runs, so that a plan that uses it runs, and is
measured, on CPU too. Triton is optional (``pip install memopt[triton]``): without it the references run.
"""

from torch import fx

from memopt.lower.kernels import compress, cross_entropy
from memopt.lower.kernels.cross_entropy import (
    LSE_BYTES_PER_TOKEN,
    LinearCrossEntropyBlocks,
    linear_cross_entropy,
    linear_cross_entropy_blocks,
    linear_cross_entropy_reference,
    triton_runs,
)

__all__ = [
    "LSE_BYTES_PER_TOKEN",
    "LinearCrossEntropyBlocks",
    "kernel_scratch",
    "linear_cross_entropy",
    "linear_cross_entropy_blocks",
    "linear_cross_entropy_reference",
    "triton_runs",
]


def kernel_scratch(node: fx.Node) -> int:
    """What the op of a graph node that is one of memopt's kernels allocates inside itself beyond its inputs and
    results (0 for any other node)."""
    return cross_entropy.kernel_scratch(node) + compress.kernel_scratch(node)
