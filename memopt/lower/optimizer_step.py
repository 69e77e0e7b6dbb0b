"""The user's optimizer stepping one parameter at a time inside the backward (``step_in_backward=True``).

Each update runs the optimizer's own ``step()`` over a group holding that parameter
alone, with its gradient set for the call only: the per-parameter code eager runs
(bitwise the same for the single-tensor SGD, Adam and AdamW), the same state dict.
The parameter's ``.grad`` is None again afterwards, so the user's own
``optimizer.step()`` finds no gradient and applies nothing twice.

The contract: ``optimizer.step()`` is called after each backward, as in any
training loop. A second forward without it means gradients were meant to
accumulate over several backwards, which an update inside each backward cannot
honour: refused, with the way out. Clipping by the global gradient norm needs
every gradient before any update, so it cannot compose either (the gradients are
gone when it would run); a loop that clips keeps ``step_in_backward=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memopt.errors import MemoptError


class InBackwardSteps:
    """Updates for the parameters the plan steps inside the backward, and the check that the user steps too."""

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: dict[str, nn.Parameter]) -> None:
        self.optimizer, self.parameters = optimizer, parameters
        self._inside = False  # one of our own per-parameter steps is running
        self._updated = False  # the last backward updated parameters, and the user has not called step() since
        self._hook = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._inside:
            self._updated = False

    def update_of(self, name: str) -> Callable[[Any, torch.Tensor], None]:
        """The update of parameter ``name`` from its gradient, as the backward calls it."""
        parameter = self.parameters[name]
        group = next(g for g in self.optimizer.param_groups if any(p is parameter for p in g["params"]))

        def update(_value: Any, gradient: torch.Tensor) -> None:
            groups = self.optimizer.param_groups
            self.optimizer.param_groups = [{**group, "params": [parameter]}]  # the group's current settings
            parameter.grad, self._inside = gradient, True
            try:
                self.optimizer.step()
            finally:
                self.optimizer.param_groups, parameter.grad, self._inside = groups, None, False
            self._updated = True

        return update

    def check_before_forward(self) -> None:
        """Refuses a forward after a backward that updated parameters when ``optimizer.step()`` was not called."""
        if self._updated:
            raise MemoptError(
                "step_in_backward=True: the last backward already updated the parameters, and optimizer.step() was "
                "not called since; call it after each backward (it finds no gradient and does nothing). Gradient "
                "accumulation over several backwards, and clipping by the global gradient norm, cannot compose "
                "with updates inside the backward: use step_in_backward=False for those")
