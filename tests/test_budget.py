import pytest

from memopt import BudgetParseError, DeviceSpec, get_device, parse_budget
from memopt.budget import budget_for_peak, format_bytes, planned_part
from memopt.errors import UnknownDeviceError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GB", 24 * 10**9),
        ("24 gb", 24 * 10**9),
        ("500MB", 500 * 10**6),
        ("24GiB", 24 * 2**30),
        ("512 MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("0.5 GiB", 2**29),
        ("  7kib ", 7 * 1024),
        ("1TB", 10**12),
        ("2tib", 2 * 2**40),
        ("4096", 4096),
        ("4096B", 4096),
        (123_456, 123_456),
    ],
)
def test_budget_forms(text, expected):
    assert parse_budget(text) == expected


def test_no_budget_is_none():
    assert parse_budget(None) is None


@pytest.mark.parametrize("bad", ["24 gigs", "GB", "", "-5GB", "0", 0, -1, 1.5, True, "1e9", "24G B", [24]])
def test_bad_budget_is_a_typed_error_naming_the_forms(bad):
    with pytest.raises(BudgetParseError) as info:
        parse_budget(bad)
    message = str(info.value)
    assert "GiB" in message and "GB" in message and repr(bad) in message
    assert isinstance(info.value, ValueError)


def test_format_bytes():
    assert format_bytes(100) == "100 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"


@pytest.mark.parametrize("peak", [1, 99, 1000, 375_134_208, 10**12 + 7])
@pytest.mark.parametrize("headroom", [0.0, 0.02, 0.1])
def test_budget_for_peak_is_the_smallest_budget_whose_planned_part_holds_the_peak(peak, headroom):
    budget = budget_for_peak(peak, headroom)
    assert planned_part(budget, headroom) >= peak
    assert budget == 1 or planned_part(budget - 1, headroom) < peak


def test_device_presets():
    h100 = get_device("H100")
    assert h100.is_cuda and h100.memory_bytes == 80 * 10**9 and h100.host_link_bandwidth > 0
    for name in ("a100-80gb", "a100-40gb", "rtx4090", "cpu"):
        spec = get_device(name)
        assert spec.memory_bytes > 0 and spec.flops_per_s > 0 and spec.memory_bandwidth > 0
    assert get_device("a100") == get_device("a100-80gb")
    assert not get_device(None).is_cuda
    custom = DeviceSpec("mine", "cuda", 10**9, 1e12, 1e12, 1e11, 1e10)
    assert get_device(custom) is custom


def test_unknown_device_lists_the_presets():
    with pytest.raises(UnknownDeviceError, match="h100.*rtx4090|rtx4090.*h100"):
        get_device("tpu-v9")
