"""The shell door: `memopt plan|explain|pareto MODULE:FACTORY ...`.

FACTORY is a callable in MODULE that returns a memopt.examples.Workload, or a
tuple (model, example_inputs) or (model, example_inputs, loss_fn). MODULE is a
module name (the current directory is searched first, as `python -m` does) or
a path to a .py file, e.g. examples/vision_bn.py:workload. Keyword arguments
reach FACTORY as --arg NAME=VALUE (VALUE read as a Python literal). Passes
that run longer than a second say so on stderr (--quiet: not at all).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any

import memopt
from memopt.config import PlanConfig
from memopt.errors import MemoptError
from memopt.examples import Workload
from memopt.progress import show_progress, timed
from memopt.report.pareto import BASELINES, pareto

_log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = contextlib.nullcontext() if args.quiet else show_progress(sys.stderr)
    try:
        with progress:
            return _pareto(args) if args.command == "pareto" else _plan(args)
    except MemoptError as error:
        print(f"memopt: {error}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace) -> int:
    kwargs = dict(_literal(kv) for kv in args.arg)

    def plan_at(**changed: Any) -> memopt.MemoryPlan:
        model, inputs, loss_fn, optimizer = _load(args.target, {**kwargs, **changed})
        with timed("plan", _log):  # the trace and every pass
            return memopt.plan(model, inputs, loss_fn=loss_fn, optimizer=optimizer, budget=args.budget,
                               device=args.device, layout=args.layout, solver=args.solver,
                               world_size=args.world_size, config=_config(args))

    if args.largest is None:
        plan = plan_at()
    else:
        found = _largest(args, kwargs, plan_at)
        print(found)
        if found.plan is None:
            return 1
        plan = found.plan
    if args.json:
        print(plan.to_json())
    else:
        print(plan.explain() if args.command == "explain" else plan)
    if args.png:
        path = plan.plot(args.png)
        if not args.json:
            print(f"\ntimeline: {path}")
    return 0


def _largest(args: argparse.Namespace, kwargs: dict[str, Any], plan_at: Any) -> memopt.Largest:
    """The largest value of FACTORY's argument ``--largest`` that fits ``--budget``, from its --arg or default."""
    if args.budget is None:
        raise MemoptError("--largest searches for the largest value that fits a budget: give --budget too")
    start = kwargs.get(args.largest)
    if start is None:
        default = inspect.signature(_factory(args.target)).parameters.get(args.largest)
        start = None if default is None else default.default
    if not isinstance(start, int) or isinstance(start, bool):
        raise MemoptError(f"--largest {args.largest}: FACTORY needs an int argument {args.largest!r} to start from "
                          f"(give --arg {args.largest}=N), got {start!r}")
    return memopt.largest_fitting(lambda value: plan_at(**{args.largest: value}), name=args.largest, start=start,
                                  step=args.step)


def _pareto(args: argparse.Namespace) -> int:
    model, inputs, loss_fn, optimizer = _load(args.target, dict(_literal(kv) for kv in args.arg))
    budgets = [b.strip() for b in args.budgets.split(",")] if args.budgets else None
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    curve = pareto(model, inputs, loss_fn=loss_fn, optimizer=optimizer, device=args.device, budgets=budgets,
                   points=args.points, baselines=baselines, config=_config(args))
    print(curve.to_json() if args.json else curve)
    if args.png:
        path = curve.plot(args.png)
        if not args.json:
            print(f"\ncurve: {path}")
    return 0


def _config(args: argparse.Namespace) -> PlanConfig | None:
    return None if args.time_limit is None else PlanConfig(remat_time_limit_s=args.time_limit)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memopt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("plan", "print the ledger at the peak"), ("explain", "print the tensors behind the peak"),
                       ("pareto", "plan at a range of budgets: predicted recompute overhead against budget")):
        command = commands.add_parser(name, help=text)
        command.add_argument("target", help="MODULE:FACTORY, e.g. memopt.examples:gpt2 or "
                             "examples/vision_bn.py:workload")
        command.add_argument("--device", help="h100, a100-80gb, a100-40gb, rtx4090 or cpu")
        command.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                             help="a keyword argument for FACTORY, e.g. --arg batch=4")
        command.add_argument("--json", action="store_true", help="print the result as JSON (progress stays on stderr)")
        command.add_argument("--time-limit", type=float, metavar="SECONDS",
                             help="the remat solver's time limit per plan (default 5)")
        command.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
        if name == "pareto":
            command.add_argument("--png", help="write the curve here")
            command.add_argument("--points", type=int, default=8,
                                 help="budgets from memopt's smallest to the eager peak (default 8)")
            command.add_argument("--budgets", metavar="B1,B2,...", help='these budgets instead, e.g. "40MiB,60MiB"')
            command.add_argument("--baselines", default=",".join(BASELINES),
                                 help=f"remat baselines to mark as points (default {','.join(BASELINES)})")
            continue
        command.add_argument("--budget", help='bytes or a size such as "24GB" or "8GiB"')
        command.add_argument("--solver", help="remat solver: memopt (default), or a baseline: blocks, sqrt, none")
        command.add_argument("--layout", action="store_true", help="also plan one arena for the intermediates")
        command.add_argument("--png", help="write the timeline plot here")
        command.add_argument("--world-size", type=int, metavar="N",
                             help="plan one rank of N under FSDP2 (fully_shard on every block and the root)")
        command.add_argument("--largest", metavar="NAME", help="the largest value of FACTORY's int argument NAME "
                             "(batch, seq) that fits --budget: doubling, halving, then bisecting from its value")
        command.add_argument("--step", type=int, default=1, help="--largest searches multiples of this (default 1)")
    return parser


def _literal(pair: str) -> tuple[str, Any]:
    name, _, value = pair.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def _factory(target: str) -> Any:
    module_name, _, factory_name = target.rpartition(":")
    if not module_name or not factory_name:
        raise MemoptError(f"{target!r} is not MODULE:FACTORY; e.g. memopt.examples:gpt2")
    try:
        return getattr(_import(module_name), factory_name)
    except (ImportError, AttributeError, OSError) as error:
        raise MemoptError(f"cannot load {target!r}: {error}") from error


def _load(target: str, kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    factory = _factory(target)
    factory_name = target.rpartition(":")[2]
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call say what is wrong
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as error:
            raise MemoptError(f"{target} does not take {sorted(kwargs)}: {error}; its signature is "
                              f"{factory_name}{signature}") from error
    made = factory(**kwargs)
    if isinstance(made, Workload):
        model = made.build()
        return model, made.inputs(), made.loss_fn, (made.optimizer_cls, made.optimizer_kwargs)
    if isinstance(made, tuple) and len(made) in (2, 3):
        return made[0], made[1], made[2] if len(made) == 3 else None, None
    raise MemoptError(
        f"{target} returned {type(made).__name__}; return a memopt.examples.Workload or "
        "(model, example_inputs[, loss_fn])"
    )


def _import(module_name: str) -> Any:
    """A module by name (the current directory searched first) or by the path of its .py file."""
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise ImportError(f"no file {module_name}")
        name = f"memopt_cli_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up here
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(module_name)


if __name__ == "__main__":
    sys.exit(main())
