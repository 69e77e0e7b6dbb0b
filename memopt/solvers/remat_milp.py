"""Exact rematerialization: the Checkmate MILP (Jain et al., MLSys 2020) on CP-SAT.

The yardstick for memopt's fast remat solvers. Plain data in, a ``RematSolution``
out; no torch. Stages t = 0..n-1: stage t (re)computes nodes in topological
order and ends by computing node t. ``R[t][i]``: node i is computed in stage t;
``S[t][i]``: the result of i is resident when stage t begins. A node needs each
dependency kept into its stage or computed earlier in it; a result is freed
right after its last use in a stage unless it is kept into the next one;
outputs stay resident after the last stage. Memory is Checkmate's ``U[t][k]``:
the bytes resident right after node k is computed in stage t, before frees,
static bytes included. The objective is the total compute cost,
``sum costs[i] * R[t][i]``.

The model is Checkmate's with two changes, neither of which cuts off every
optimum: ``FREE[t][i][k]`` is tied to its definition by boolean clauses (the
paper linearizes the same product with a "hazard" count), and three dominance
constraints prune schedules that waste work: no node computed in a stage where
it is already resident, none computed that is neither used later in the stage
nor kept, none kept into a stage that neither uses it nor keeps it further.
Because of the second, a node never needs freeing right after its own
computation, so the paper's FREE[t][k][k] terms are left out.

Scaling (CP-SAT wants integers): sizes and the budget are divided by the gcd of
the sizes (the budget rounded down: exact). Costs become integer units,
``floor(cost / unit)``: unit 1 when every cost is a whole number (exact), else
the largest cost over ``COST_RESOLUTION``. Rounding down keeps the reported
lower bound valid; an "optimal" schedule is then optimal up to one unit per
recomputation. Objective and gap are always recomputed from the float costs.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ortools.sat.python import cp_model

log = logging.getLogger(__name__)

# cost units per largest cost when costs are not whole numbers
COST_RESOLUTION = 1_000_000
_EXACT_COST_LIMIT = 1 << 40  # whole-number costs up to this are used as they are
# Two workers interleaved in one thread: deterministic, and on 50-node graphs several times faster to
# prove than one worker; linearization_level 2 puts the FREE clauses into the LP, which moves the bound.
SOLVER_PARAMETERS = {
    "num_workers": 2,
    "interleave_search": True,
    "linearization_level": 2,
}


@dataclass(frozen=True, slots=True)
class RematProblem:
    """Nodes 0..n-1 in topological order: what each costs, how big its result is, what it reads."""

    costs: tuple[float, ...]  # per node: seconds to (re)compute it
    sizes: tuple[int, ...]  # per node: bytes of its result
    deps: tuple[tuple[int, ...], ...]  # per node: the nodes whose results it reads, all < the node
    budget_bytes: int  # peak bytes allowed at every step, static_bytes included
    static_bytes: int = 0  # always resident (parameters, optimizer state, ...)
    recomputable: tuple[bool, ...] = ()  # per node; empty = all True. False: computed exactly once
    outputs: tuple[int, ...] = ()  # nodes whose results must be resident after the last stage

    def __post_init__(self) -> None:
        n = len(self.costs)
        costs = tuple(float(c) for c in self.costs)
        try:
            sizes = tuple(operator.index(s) for s in self.sizes)
            deps = tuple(tuple(sorted({operator.index(d) for d in ds})) for ds in self.deps)
            outputs = tuple(sorted({operator.index(o) for o in self.outputs}))
            budget, static = (
                operator.index(self.budget_bytes),
                operator.index(self.static_bytes),
            )
        except TypeError:
            raise ValueError(
                "RematProblem: sizes, deps, outputs, budget_bytes and static_bytes must be integers"
            ) from None
        recomputable = tuple(bool(r) for r in self.recomputable)
        for name, values in (
            ("sizes", sizes),
            ("deps", deps),
            ("recomputable", recomputable or costs),
        ):
            if len(values) != n:
                raise ValueError(f"RematProblem: {name} has {len(values)} entries but costs has {n}; give one per node")
        for i, (c, s, ds) in enumerate(zip(costs, sizes, deps)):
            if not (c >= 0 and math.isfinite(c)):
                raise ValueError(f"RematProblem: node {i} has cost {c}; costs must be finite and >= 0")
            if s < 0:
                raise ValueError(f"RematProblem: node {i} has negative size {s}")
            if ds and not (0 <= ds[0] and ds[-1] < i):
                raise ValueError(
                    f"RematProblem: node {i} reads node {ds[0] if ds[0] < 0 else ds[-1]}; "
                    f"deps must be earlier nodes (0..{i - 1}): number the nodes in a topological order"
                )
        if outputs and not (0 <= outputs[0] and outputs[-1] < n):
            raise ValueError(f"RematProblem: outputs {outputs} name nodes outside 0..{n - 1}")
        if static < 0:
            raise ValueError(f"RematProblem: static_bytes is {static}; it must be >= 0")
        fields = (costs, sizes, deps, budget, static, recomputable, outputs)
        for name, value in zip(self.__slots__, fields):
            object.__setattr__(self, name, value)


@dataclass(frozen=True, slots=True)
class RematSolution:
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown" (time out with no solution)
    objective: float | None  # total compute cost of the schedule, each node's first computation included
    lower_bound: float | None  # proven bound on the objective
    gap: float | None  # (objective - lower_bound) / objective
    seconds: float
    compute: tuple[tuple[bool, ...], ...]  # R[t][i]: node i (re)computed during stage t
    keep: tuple[tuple[bool, ...], ...]  # S[t][i]: result of i resident at the start of stage t
    peak_bytes: int | None  # the schedule's simulated peak, static_bytes included


def _recomputable(p: RematProblem) -> tuple[bool, ...]:
    return p.recomputable or (True,) * len(p.costs)


def _users(p: RematProblem) -> list[list[int]]:
    users: list[list[int]] = [[] for _ in p.costs]
    for k, ds in enumerate(p.deps):
        for i in ds:
            users[i].append(k)
    return users


def _matrix(name: str, rows: Sequence[Sequence[bool]], n: int) -> list[list[bool]]:
    if len(rows) != n or any(len(r) != n for r in rows):
        raise ValueError(f"{name} must be {n} rows of {n} booleans, one row per stage and one column per node")
    return [[bool(x) for x in r] for r in rows]


def simulate_schedule(problem: RematProblem, compute, keep) -> tuple[int, ...]:
    """Bytes resident (static included) right after each computation, stage by stage: Checkmate's U[t][k].

    A result is freed right after its last use in a stage (or right after its
    own computation if nothing later in the stage reads it) unless it is kept
    into the next stage; after the last stage only outputs are kept. ValueError
    names the first broken rule of a schedule that cannot run."""
    n = len(problem.costs)
    return tuple(_steps(problem, _matrix("compute", compute, n), _matrix("keep", keep, n)))


def _steps(p: RematProblem, R: list[list[bool]], S: list[list[bool]]) -> list[int]:
    n = len(p.costs)
    users, recomputable, outputs = _users(p), _recomputable(p), set(p.outputs)
    steps: list[int] = []
    resident: set[int] = set()
    for t in range(n):
        for i in range(n):
            if R[t][i] and (i > t or (i < t and not recomputable[i])):
                why = "stage t computes only nodes <= t" if i > t else "it is not recomputable"
                raise ValueError(f"stage {t} computes node {i}, but {why}")
            if S[t][i] and i >= t:
                raise ValueError(f"stage {t} keeps node {i}, which is first computed in stage {i}")
            if S[t][i] and i not in resident:
                raise ValueError(f"stage {t} keeps node {i}, which is not resident after stage {t - 1}")
        if not R[t][t]:
            raise ValueError(f"stage {t} must end by computing node {t}")
        resident = {i for i in range(n) if S[t][i]}
        kept_next = [S[t + 1][i] if t + 1 < n else i in outputs for i in range(n)]
        held = p.static_bytes + sum(p.sizes[i] for i in resident)
        for k in range(t + 1):
            if not R[t][k]:
                continue
            missing = [j for j in p.deps[k] if j not in resident]
            if missing:
                raise ValueError(
                    f"stage {t} computes node {k}, but its input {missing[0]} is neither kept into the stage "
                    f"nor computed earlier in it"
                )
            if k not in resident:
                resident.add(k)
                held += p.sizes[k]
            steps.append(held)
            for i in p.deps[k] + (k,):
                if i in resident and not kept_next[i] and not any(R[t][j] for j in users[i] if k < j <= t):
                    resident.discard(i)
                    held -= p.sizes[i]
    lost = sorted(set(p.outputs) - resident)
    if lost:
        raise ValueError(f"output {lost[0]} is not resident after the last stage")
    return steps


def no_remat_schedule(
    problem: RematProblem,
) -> tuple[tuple[tuple[bool, ...], ...], tuple[tuple[bool, ...], ...]]:
    """(compute, keep) computing every node once and keeping its result until its last use (outputs: to the end)."""
    n = len(problem.costs)
    users, outputs = _users(problem), set(problem.outputs)
    last = [n if i in outputs else max(users[i], default=i) for i in range(n)]
    compute = tuple(tuple(i == t for i in range(n)) for t in range(n))
    keep = tuple(tuple(i < t <= last[i] for i in range(n)) for t in range(n))
    return compute, keep


def _checkpoint_schedule(problem: RematProblem, held: set[int]):
    """(compute, keep) with nodes in `held` kept from their computation to their last use, every other
    result dropped after its own stage and recomputed, with whatever it needs, where a stage reads it;
    None if that would recompute a non-recomputable node."""
    p, n = problem, len(problem.costs)
    users, outputs, recomputable = _users(p), set(p.outputs), _recomputable(p)
    last = [n if i in outputs else max(users[i], default=i) for i in range(n)]
    S = [[i in held and i < t <= last[i] for i in range(n)] for t in range(n)]
    R = [[False] * n for _ in range(n)]
    for t in range(n):
        need = [t] + ([o for o in p.outputs if not (o in held and o < t)] if t == n - 1 else [])
        while need:
            k = need.pop()
            if not R[t][k] and not S[t][k]:
                if k != t and not recomputable[k]:
                    return None
                R[t][k] = True
                need.extend(p.deps[k])
    return R, S


def _greedy_schedule(problem: RematProblem):
    """A schedule within budget from _checkpoint_schedule, or None: starting with every result held,
    drop the held result with the most bytes per cost at the peak stage until the schedule fits."""
    p, n = problem, len(problem.costs)
    recomputable, outputs = _recomputable(p), set(p.outputs)
    held = set(range(n))
    schedule = _checkpoint_schedule(p, held)
    while True:
        R, S = schedule
        peak, stage = max(zip(_steps(p, R, S), _stages(R)), default=(p.static_bytes, 0))
        if peak <= p.budget_bytes:
            return R, S
        victims = [i for i in range(stage) if S[stage][i] and recomputable[i] and i not in outputs]
        victims.sort(key=lambda i: (-p.sizes[i] / (p.costs[i] + 1e-9), i))
        for v in victims:
            schedule = _checkpoint_schedule(p, held - {v})
            if schedule is not None:
                held.discard(v)
                break
        else:
            return None


def _stages(R) -> list[int]:
    return [t for t, row in enumerate(R) for x in row if x]


def _minimum_step(problem: RematProblem) -> tuple[int, int]:
    """(bytes, stage): the most any schedule must hold at the last step of some stage.

    At stage t's last step node t and its inputs are resident, so is every
    non-recomputable node computed before t and still needed at t or later,
    and at the last stage every output."""
    p, n = problem, len(problem.costs)
    users, recomputable, outputs = _users(p), _recomputable(p), set(p.outputs)
    best = (p.static_bytes, -1)
    for t in range(n):
        held = {t, *p.deps[t]}
        held.update(i for i in range(t) if not recomputable[i] and (i in outputs or max(users[i], default=i) >= t))
        if t == n - 1:
            held |= outputs
        best = max(best, (p.static_bytes + sum(p.sizes[i] for i in held), t))
    return best


def minimum_budget(problem: RematProblem) -> int:
    """A budget below this fits no schedule (a lower bound, not always reachable)."""
    return _minimum_step(problem)[0]


def _cost_units(costs: Sequence[float]) -> tuple[float, list[int]]:
    """(unit, integer costs) with integer * unit <= cost; see the module docstring."""
    top = max(costs, default=0.0)
    if top == 0:
        return 1.0, [0] * len(costs)
    if all(c == int(c) for c in costs) and top * len(costs) ** 2 <= _EXACT_COST_LIMIT:
        return 1.0, [int(c) for c in costs]
    unit = top / COST_RESOLUTION
    return unit, [min(math.floor(c / unit), COST_RESOLUTION) for c in costs]


def _solution(problem, status, began, R=None, S=None, lower=None) -> RematSolution:
    if R is None:
        return RematSolution(status, None, lower, None, time.perf_counter() - began, (), (), None)
    n = len(problem.costs)
    objective = sum(problem.costs[i] for t in range(n) for i in range(n) if R[t][i])
    peak = max(simulate_schedule(problem, R, S), default=problem.static_bytes)
    if peak > problem.budget_bytes:  # cannot happen while the model is exact; never hand out such a plan
        raise RuntimeError(
            f"remat MILP returned a schedule peaking at {peak} bytes, over the budget {problem.budget_bytes}"
        )
    lower = objective if lower is None else min(lower, objective)
    gap = (objective - lower) / objective if objective > 0 else 0.0
    if status == "optimal" and gap > 1e-9:
        status = "feasible"  # stopped at the relative_gap
    R = tuple(tuple(bool(x) for x in row) for row in R)
    S = tuple(tuple(bool(x) for x in row) for row in S)
    return RematSolution(status, objective, lower, gap, time.perf_counter() - began, R, S, peak)


def solve_remat_milp(
    problem: RematProblem,
    *,
    time_limit_s: float = 30.0,
    seed: int = 0,
    relative_gap: float = 0.0,
) -> RematSolution:
    """The cheapest schedule whose every step fits problem.budget_bytes, by the Checkmate MILP.

    Answers at once, without the solver, when the budget is below
    ``minimum_budget`` ("infeasible") or the no-remat schedule fits ("optimal":
    nothing is recomputed). Otherwise CP-SAT starts from a greedy checkpointing
    schedule when one fits (hint), with SOLVER_PARAMETERS and `seed`: its
    workers interleave in one thread, so an answer reached before
    `time_limit_s` is the same on every run. It stops once (objective - bound)
    <= relative_gap * objective. Out of time with no CP-SAT solution, the greedy
    schedule comes back as "feasible", or "unknown" without one.
    """
    began = time.perf_counter()
    if time_limit_s <= 0 or not 0 <= relative_gap < 1:
        raise ValueError(f"time_limit_s must be > 0 and relative_gap in [0, 1), got {time_limit_s} and {relative_gap}")
    p, n = problem, len(problem.costs)
    minimum, stage = _minimum_step(p)
    if p.budget_bytes < minimum:
        log.debug(
            "remat: budget %d below the %d bytes stage %d needs",
            p.budget_bytes,
            minimum,
            stage,
        )
        return _solution(p, "infeasible", began)
    R0, S0 = no_remat_schedule(p)
    if max(simulate_schedule(p, R0, S0), default=p.static_bytes) <= p.budget_bytes:
        return _solution(p, "optimal", began, R0, S0)
    greedy = _greedy_schedule(p)
    model, R, S = _build(p, greedy)
    unit, cost = _cost_units(p.costs)
    model.minimize(sum(cost[i] * R[t][i] for t in range(n) for i in range(t) if not isinstance(R[t][i], int)))
    solver = cp_model.CpSolver()
    for name, value in SOLVER_PARAMETERS.items():
        setattr(solver.parameters, name, value)
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.random_seed = seed
    solver.parameters.absolute_gap_limit = relative_gap * sum(cost)  # <= relative_gap * objective: every node runs once
    code = solver.solve(model)
    log.debug(
        "remat cp-sat: %s in %.3fs, %d nodes",
        solver.status_name(code),
        solver.wall_time,
        n,
    )
    if code == cp_model.INFEASIBLE:
        return _solution(p, "infeasible", began)
    if code == cp_model.MODEL_INVALID:
        raise RuntimeError(f"remat MILP built an invalid CP-SAT model: {model.validate()}")
    bound = sum(p.costs) + unit * max(0, math.ceil(solver.best_objective_bound - 1e-6))
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if greedy is not None:  # out of time before CP-SAT took the hint: the heuristic plan
            return _solution(p, "feasible", began, *greedy, bound)
        return _solution(p, "unknown", began, lower=bound)

    def values(rows):
        return [[bool(v) if isinstance(v, int) else solver.boolean_value(v) for v in row] for row in rows]

    status = "optimal" if code == cp_model.OPTIMAL else "feasible"
    return _solution(p, status, began, values(R), values(S[:n]), bound)


def _one(x) -> bool:
    return isinstance(x, int) and x == 1


def _build(p: RematProblem, hint=None):
    """The CP-SAT model and its R, S tables (n+1 rows of S: row n holds the outputs); constants are ints.

    `hint`: a valid (compute, keep) to start from; FREE follows from it."""
    n = len(p.costs)
    users, recomputable, outputs = _users(p), _recomputable(p), set(p.outputs)
    sizes = [s for s in p.sizes if s]
    g = math.gcd(*sizes) if sizes else 1
    m = [s // g for s in p.sizes]
    cap = (p.budget_bytes - p.static_bytes) // g
    model = cp_model.CpModel()
    R = [[(1 if i == t else model.new_bool_var(f"R{t}_{i}") if i < t and recomputable[i] else 0) for i in range(n)]
         for t in range(n)]  # fmt: skip
    S = [[model.new_bool_var(f"S{t}_{i}") if i < t else 0 for i in range(n)] for t in range(n)]
    S.append([int(i in outputs) for i in range(n)])
    hinted: dict[int, bool] = {}

    def value(x) -> bool:
        return bool(x) if isinstance(x, int) else hinted[x.index]

    if hint is not None:
        for rows, given in ((R, hint[0]), (S, hint[1])):
            for row, given_row in zip(rows, given):
                for x, v in zip(row, given_row):
                    if not isinstance(x, int):
                        hinted[x.index] = bool(v)
                        model.add_hint(x, bool(v))

    def at_most(terms, bound):  # sum(terms) <= bound; ints are constants
        total = sum(terms)
        if isinstance(total, int):
            if total > bound:
                model.add_bool_or([])  # false: the model is infeasible
        else:
            model.add(total <= bound)

    def implies(lhs, terms):  # lhs <= sum(terms)
        at_most([lhs] + [-1 * x for x in terms], 0)

    for t in range(n):
        for i in range(n):
            implies(S[t + 1][i], [S[t][i], R[t][i]])  # kept into t+1: resident in t, or computed in it
            if i < t:
                at_most([R[t][i], S[t][i]], 1)  # never recompute a resident result
                used = [S[t + 1][i]] + [R[t][j] for j in users[i] if j <= t]
                implies(R[t][i], used)  # computed only if used later in the stage or kept
                implies(S[t][i], used)  # kept only if used in the stage or kept on
        for k in range(t + 1):
            for j in p.deps[k]:
                implies(R[t][k], [R[t][j], S[t][j]])  # inputs resident or computed earlier in the stage
    for t in range(n):
        held = [m[i] * S[t][i] for i in range(t)]
        for k in range(t + 1):
            if isinstance(R[t][k], int) and not R[t][k]:
                continue
            held.append(m[k] * R[t][k])
            at_most(held, cap)  # U[t][k]: right after computing k, before frees
            for i in p.deps[k]:
                later = [R[t][j] for j in users[i] if k < j <= t]
                if _one(S[t + 1][i]) or any(_one(x) for x in later):
                    continue  # kept, or node t reads it later in the stage: not freed here
                # FREE[t][i][k] = R[t][k] and not S[t+1][i] and no later user of i computed in stage t
                conds = [R[t][k]] if not isinstance(R[t][k], int) else []
                conds += [~x for x in [S[t + 1][i]] + later if not isinstance(x, int)]
                if not conds:
                    held.append(-m[i])
                    continue
                free = model.new_bool_var(f"F{t}_{i}_{k}")
                if hint is not None:
                    model.add_hint(
                        free,
                        value(R[t][k]) and not value(S[t + 1][i]) and not any(map(value, later)),
                    )
                model.add_bool_and(conds).only_enforce_if(free)
                model.add_bool_or([x.Not() for x in conds] + [free])
                held.append(-m[i] * free)
    return model, R, S
