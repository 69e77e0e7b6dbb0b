"""Measurement: the real peak of one call (profiler), not what a plan predicts."""

from memopt.measure.profiler import (
    MeasuredPeak,
    host_memory_bytes,
    live_tensor_bytes,
    mark_host_memory,
    measure_peak,
    measure_steady_peak,
)

__all__ = ["MeasuredPeak", "host_memory_bytes", "live_tensor_bytes", "mark_host_memory", "measure_peak",
           "measure_steady_peak"]
