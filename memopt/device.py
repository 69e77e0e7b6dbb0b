"""DeviceSpec: what a device holds and how fast it moves and computes."""

from __future__ import annotations

from dataclasses import dataclass

from memopt.errors import UnknownDeviceError


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device as the planner sees it. Bandwidths in bytes/s, compute in FLOP/s."""

    name: str
    kind: str  # "cuda" or "cpu": which allocator and which optimizer implementation apply
    memory_bytes: int
    flops_per_s: float  # dense bf16/fp16 tensor-core peak (fp32 for cpu)
    fp32_flops_per_s: float
    memory_bandwidth: float
    host_link_bandwidth: float  # device <-> host, one direction

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


# Figures from the vendors' data sheets (dense, no sparsity); cpu is a modest 2-core host.
PRESETS: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in (
        DeviceSpec("h100", "cuda", 80 * 10**9, 989e12, 67e12, 3.35e12, 55e9),
        DeviceSpec("a100-80gb", "cuda", 80 * 10**9, 312e12, 19.5e12, 2.0e12, 25e9),
        DeviceSpec("a100-40gb", "cuda", 40 * 10**9, 312e12, 19.5e12, 1.555e12, 25e9),
        DeviceSpec("rtx4090", "cuda", 24 * 10**9, 165e12, 82.6e12, 1.008e12, 25e9),
        DeviceSpec("cpu", "cpu", 24 * 2**30, 1e11, 1e11, 2e10, 2e10),
    )
}
_ALIASES = {"a100": "a100-80gb", "h100-80gb": "h100", "4090": "rtx4090"}


def get_device(device: str | DeviceSpec | None, default: str = "cpu") -> DeviceSpec:
    """A DeviceSpec from a preset name (case-insensitive), a DeviceSpec, or None (the default)."""
    if isinstance(device, DeviceSpec):
        return device
    name = (device or default).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in PRESETS:
        raise UnknownDeviceError(name, sorted(PRESETS))
    return PRESETS[name]
