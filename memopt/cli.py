"""The shell door: `memopt plan MODULE:FACTORY ...` and `memopt explain MODULE:FACTORY ...`.

FACTORY is a callable in MODULE that returns a memopt.examples.Workload, or a
tuple (model, example_inputs) or (model, example_inputs, loss_fn). Keyword
arguments reach it as --arg NAME=VALUE (VALUE read as a Python literal).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from typing import Any

import memopt
from memopt.errors import MemoptError
from memopt.examples import Workload


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model, inputs, loss_fn, optimizer = _load(args.target, dict(_literal(kv) for kv in args.arg))
        plan = memopt.plan(model, inputs, loss_fn=loss_fn, optimizer=optimizer, budget=args.budget,
                           device=args.device, layout=args.layout)
    except MemoptError as error:
        print(f"memopt: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(plan.to_json())
    else:
        print(plan.explain() if args.command == "explain" else plan)
    if args.png:
        path = plan.plot(args.png)
        if not args.json:
            print(f"\ntimeline: {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memopt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("plan", "print the ledger at the peak"), ("explain", "print the tensors behind the peak")):
        command = commands.add_parser(name, help=text)
        command.add_argument("target", help="MODULE:FACTORY, e.g. memopt.examples:gpt2")
        command.add_argument("--budget", help='bytes or a size such as "24GB" or "8GiB"')
        command.add_argument("--device", help="h100, a100-80gb, a100-40gb, rtx4090 or cpu")
        command.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                             help="a keyword argument for FACTORY, e.g. --arg batch=4")
        command.add_argument("--layout", action="store_true", help="also plan one arena for the intermediates")
        command.add_argument("--json", action="store_true", help="print the plan as JSON")
        command.add_argument("--png", help="write the timeline plot here")
    return parser


def _literal(pair: str) -> tuple[str, Any]:
    name, _, value = pair.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def _load(target: str, kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    module_name, _, factory_name = target.partition(":")
    if not factory_name:
        raise MemoptError(f"{target!r} is not MODULE:FACTORY; e.g. memopt.examples:gpt2")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as error:
        raise MemoptError(f"cannot load {target!r}: {error}") from error
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


if __name__ == "__main__":
    sys.exit(main())
