"""Typed errors. Each one names the problem, the numbers involved and the way out."""

from __future__ import annotations


class MemoptError(Exception):
    """Base class of every error memopt raises on purpose."""


class MemoptWarning(UserWarning):
    """Something the user should know about how memopt planned a step: what it may miss, and how to say it."""


class BudgetParseError(MemoptError, ValueError):
    """A budget that is not one of the accepted forms."""

    def __init__(self, value: object) -> None:
        self.value = value
        super().__init__(
            f"cannot read {value!r} as a memory budget; use a number of bytes (an int such as "
            "25_000_000_000), a power-of-ten size ('24GB', '500 MB', '1.5tb') or a power-of-two "
            "size ('24GiB', '512 MiB'). Units: B, KB, MB, GB, TB (x1000) and KiB, MiB, GiB, TiB (x1024), "
            "case-insensitive."
        )


class UnknownDeviceError(MemoptError, ValueError):
    """A device name that has no DeviceSpec preset."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name, self.known = name, known
        super().__init__(
            f"unknown device {name!r}; use one of {', '.join(known)}, or pass a DeviceSpec(...) of your own"
        )


class CaptureError(MemoptError):
    """The model could not be traced into a joint forward/backward graph."""


class ModelForwardError(CaptureError):
    """The model's forward (or the loss function) raised while memopt traced it."""


class LossNotScalarError(CaptureError):
    """The loss is not a scalar tensor, so there is no backward to plan."""


class UnsupportedOptimizerError(MemoptError, TypeError):
    """An optimizer whose state and step memory memopt cannot account for."""


class MeasurementError(MemoptError):
    """The memory measurement could not be taken or does not add up."""


class BudgetInfeasibleError(MemoptError):
    """No plan fits the budget; names the smallest budget memopt can prove is needed and where."""

    def __init__(self, budget: int, minimum: int, where: str, why: str = "", *, proven: int | None = None,
                 chunked_minimum: int | None = None, chunk_options: str = "chunk_loss='auto'") -> None:
        # minimum: the smallest budget memopt can meet; proven: no keep/recompute plan of these ops needs less;
        # chunked_minimum: the smallest with the loss head and the MLPs over slices of the tokens (chunk_options,
        # which name the knobs that reach it), if lower
        self.budget, self.minimum, self.where, self.why = budget, minimum, where, why
        self.proven_minimum = minimum if proven is None else proven
        self.chunked_minimum, self.chunk_options = chunked_minimum, chunk_options
        from memopt.budget import format_bytes

        chunked = ("" if chunked_minimum is None else
                   f", or pass {chunk_options} (over slices of the tokens: the loss head's logits, the MLPs' wide "
                   f"tensors never exist whole; exact up to the order of the sums over the tokens), which meets "
                   f"{format_bytes(chunked_minimum)}")
        super().__init__(
            f"budget {budget:,} bytes ({format_bytes(budget)}) is below the smallest that can work, "
            f"{minimum:,} bytes ({format_bytes(minimum)}), needed at {where}{': ' + why if why else ''}; "
            f"raise the budget to at least {format_bytes(minimum)}{chunked}"
        )
