"""memopt: a memory compiler for PyTorch training.

    plan = memopt.plan(model, example_inputs, optimizer=opt, budget="24GB")
    print(plan); plan.explain(); plan.plot("plan.png"); plan.to_json()
    model = memopt.compile(model, budget="24GB", optimizer=opt)  # trains with the plan: model(x).backward()
    torch.compile(model, backend="memopt", options={"budget": "24GB"})  # memopt.backend.plans(options)
    memopt.measure_peak(step_fn)  # the real peak of one call
    memopt.plan(model, rank_batch, optimizer=opt, budget="80GB", world_size=8)  # one rank of 8 under FSDP2
"""

from memopt import backend
from memopt._version import __version__ as __version__
from memopt.api import CompiledModule, compile, plan
from memopt.budget import format_bytes, parse_budget
from memopt.device import PRESETS as DEVICES
from memopt.device import DeviceSpec, get_device
from memopt.errors import (
    BudgetInfeasibleError,
    BudgetParseError,
    CaptureError,
    LossNotScalarError,
    MemoptError,
    MemoptWarning,
    ModelForwardError,
    UnsupportedOptimizerError,
)
from memopt.largest import Largest, largest_fitting
from memopt.measure import MeasuredPeak, measure_peak, measure_steady_peak
from memopt.report.pareto import ParetoCurve, ParetoPoint, pareto
from memopt.report.plan import MemoryPlan

__all__ = [
    "DEVICES", "backend", "BudgetInfeasibleError", "BudgetParseError", "CaptureError", "CompiledModule", "DeviceSpec",
    "LossNotScalarError", "compile",
    "MeasuredPeak", "MemoptError", "MemoptWarning", "MemoryPlan", "ModelForwardError", "UnsupportedOptimizerError",
    "format_bytes", "get_device", "Largest", "largest_fitting", "measure_peak", "measure_steady_peak", "parse_budget",
    "plan",
    "ParetoCurve", "ParetoPoint", "pareto",
]
