"""The Triton kernels of ``compress``: one program per block of values (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def pack_int8(x_ptr, payload_ptr, scales_ptr, n, BLOCK: tl.constexpr):
    """A block's scale (its largest magnitude over 127) and its values divided by it, rounded to the nearest int8
    (ties to even, as torch rounds)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    values = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    scale = tl.max(tl.abs(values), 0) / 127.0
    scaled = values / tl.where(scale > 0, scale, 1.0)
    rounded = tl.floor(scaled + 0.5)
    rounded = tl.where((rounded - scaled == 0.5) & (rounded % 2 != 0), rounded - 1.0, rounded)
    tl.store(payload_ptr + offsets, tl.minimum(tl.maximum(rounded, -127.0), 127.0).to(tl.int8), mask=inside)
    tl.store(scales_ptr + tl.program_id(0), scale)


@triton.jit
def unpack_int8(payload_ptr, scales_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """A block's values times its scale, in the output's dtype."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    values = tl.load(payload_ptr + offsets, mask=inside, other=0).to(tl.float32)
    scale = tl.load(scales_ptr + tl.program_id(0))
    tl.store(out_ptr + offsets, (values * scale).to(out_ptr.dtype.element_ty), mask=inside)
