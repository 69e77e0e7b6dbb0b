"""The generator state a replayed random op starts from: ``memopt::rng_state``.

A random op the backward recomputes must draw the numbers the forward drew. The
forward saves the CPU default generator's state right before the op
(``memopt::rng_state``, a small uint8 tensor, as ``torch.get_rng_state()`` gives);
the backward runs the op's copy under it with torch's
``torch.ops.higher_order.run_with_rng_state``, which restores the generator where it
was, so the generator moves in the forward only, as in eager. Both run as they are
in the FX programs, and Inductor calls them as fallback kernels.

The op carries the random tag: nothing may merge two of them, and memopt's order
keeps it between the random ops around it, as it draws nothing but reads what they left.
"""

from __future__ import annotations

import torch
from torch._prims.rng_prims import run_with_rng_state

RNG_STATE_BYTES = torch.get_rng_state().nbytes  # the CPU generator's state (Mersenne Twister), in bytes
RUN_WITH_RNG_STATE = run_with_rng_state


@torch.library.custom_op("memopt::rng_state", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def rng_state(anchor: torch.Tensor) -> torch.Tensor:
    """The CPU default generator's state now. ``anchor``, the random op's input, orders it after that input."""
    return torch.get_rng_state()


@rng_state.register_fake
def _rng_state_fake(anchor: torch.Tensor) -> torch.Tensor:
    return torch.empty(RNG_STATE_BYTES, dtype=torch.uint8, device="cpu")


RNG_STATE = torch.ops.memopt.rng_state.default
