"""Keep or recompute: the fast solver against the exact one, on random joint graphs, small real models, at scale.

Tier (a): a hand-built step with exact byte counts. Tier (b): random joint
forward/backward graphs (a forward DAG of blocks, mirrored by a backward that
reads forward results; candidates are the forward results the backward reads):
the fast plan fits, costs at most 1% more than the exact optimum, and the lower
bound is below the optimum; the exact search agrees with brute force. Tier (c):
the same on mlp, gpt2 and llama, and a 10k-node problem planned within the
solver's time limit.
"""

import functools
import itertools
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from memopt import examples
from memopt.capture import capture
from memopt.device import get_device
from memopt.passes import remat_plan
from memopt.passes.storage import storage_table
from memopt.solvers import remat_fast
from memopt.solvers.remat_exact import solve_exact
from memopt.solvers.remat_fast import Candidate, RecomputeProblem, lower_bound, simulate, solve_blocks

TOLERANCE = 1.01  # the fast plan's cost over the optimum's, at most


class JointGraph:
    """A joint graph built node by node, turned into a problem the way the remat pass does it.

    A node makes storages (``made``: their bytes) or aliases some (a view); a
    storage is read by every node reading a node it lives in; candidates are the
    forward-made storages the backward reads, each with the forward views of it.
    """

    def __init__(self) -> None:
        self.inputs: list[tuple[int, ...]] = []
        self.values: list[tuple[int, ...]] = []
        self.costs: list[float] = []
        self.kinds: list[str] = []
        self.sizes: list[int] = []
        self.start: list[int] = []
        self.outputs: set[int] = set()

    def placeholder(self, size: int) -> int:
        self.sizes.append(size)
        self.start.append(-1)
        return self.node(alias=(len(self.sizes) - 1,), kind="placeholder")

    def node(self, args=(), made=(), alias=(), cost=0.0, kind="op") -> int:
        i = len(self.inputs)
        self.inputs.append(tuple(args))
        made_here = []
        for size in made:
            self.sizes.append(size)
            self.start.append(i)
            made_here.append(len(self.sizes) - 1)
        self.values.append((*made_here, *alias))
        self.costs.append(cost)
        self.kinds.append(kind)
        return i

    def problem(self, backward_start: int, constant_bytes: int = 0) -> RecomputeProblem:
        self.node(kind="output")  # the graph's output node: reads nothing the table counts
        n = len(self.inputs)
        readers: list[list[int]] = [[] for _ in self.sizes]
        for i, args in enumerate(self.inputs):
            for s in sorted({s for a in args for s in self.values[a]}):
                readers[s].append(i)
        end = [n - 1 if s in self.outputs else max(r, default=self.start[s]) for s, r in enumerate(readers)]
        makers = set(self.start)
        candidates = []
        for s, maker in enumerate(self.start):
            if 0 <= maker < backward_start and s not in self.outputs and any(r >= backward_start for r in readers[s]):
                views = [r for r in readers[s]
                         if maker < r < backward_start and r not in makers and set(self.values[r]) <= {s}]
                candidates.append(Candidate(s, (maker, *views)))
        return RecomputeProblem(
            backward_start=backward_start, inputs=tuple(self.inputs), values=tuple(self.values),
            node_costs=tuple(self.costs), sizes=tuple(self.sizes), start=tuple(self.start), end=tuple(end),
            readers=tuple(tuple(r) for r in readers), candidates=tuple(candidates), constant_bytes=constant_bytes,
        )


def random_joint(seed: int, blocks: int, per_block: int) -> tuple[RecomputeProblem, list[list[frozenset[int]]]]:
    """Blocks of forward ops (cheap elementwise ones, costly matmuls reading a parameter, views, ops with
    three results picked by getitems), a backward node per op reading some of its inputs and its result,
    parameter gradients as outputs; per block the remat pass's options: keep, recompute the cheap, all."""
    rng = random.Random(seed)
    g = JointGraph()
    x = g.placeholder(4096)
    params = [g.placeholder(rng.choice([1024, 4096])) for _ in range(2 * blocks)]
    ops: list[tuple[int, tuple[int, ...]]] = []
    ranges = []
    current = x
    for b in range(blocks):
        first, recent = len(g.inputs), [current]
        for _ in range(per_block):
            r, src = rng.random(), rng.choice(recent[-3:])
            if r < 0.15 and g.kinds[src] != "placeholder" and len(g.values[src]) == 1:
                recent.append(g.node((src,), alias=g.values[src], kind="view"))
            elif r < 0.2:
                size = rng.choice([256, 512, 1024, 2048])
                m = g.node((src,), made=(size, size // 4, size // 4), cost=size * 1e-11 * rng.uniform(1, 3),
                           kind="multi")
                ops.append((m, (src,)))
                picks = [g.node((m,), alias=(g.values[m][k],), kind="getitem") for k in range(3)]
                recent.append(picks[0])
            else:
                args, matmul = [src], rng.random() < 0.3
                if matmul:
                    args.append(params[2 * b + rng.randrange(2)])
                elif rng.random() < 0.3 and len(recent) > 3:
                    args.append(rng.choice(recent[:-3]))
                size = rng.choice([256, 512, 1024, 2048, 4096])
                cost = size * (1e-9 * rng.uniform(2, 6) if matmul else 1e-11 * rng.uniform(1, 3))
                i = g.node(args, made=(size,), cost=cost, kind="matmul" if matmul else "op")
                ops.append((i, tuple(args)))
                recent.append(i)
        current = recent[-1]
        ranges.append((first, len(g.inputs)))
    loss = g.node((current,), made=(4,), cost=1e-12, kind="loss")
    g.outputs.add(g.values[loss][0])
    backward_start = len(g.inputs)
    grad = g.node((loss,), made=(4,), cost=1e-12, kind="seed")
    for i, args in reversed(ops):
        saved = [a for a in args if g.kinds[a] != "placeholder" and rng.random() < 0.6]
        if rng.random() < 0.36:
            saved.append(i if g.kinds[i] != "multi" else i + 1)
        size = g.sizes[g.values[i][0]]
        grad = g.node((grad, *saved), made=(size,), cost=size * 1e-11, kind="grad")
        for a in args:
            if g.kinds[a] == "placeholder" and a != x:
                weight = g.node((grad, *saved[:1]), made=(g.sizes[g.values[a][0]],), cost=size * 1e-10)
                g.outputs.add(g.values[weight][0])
    problem = g.problem(backward_start)
    options = []
    for first, stop in ranges:
        inside = [k for k, c in enumerate(problem.candidates) if first <= c.nodes[0] < stop]
        free = [k for k in inside
                if not any(stop <= r < backward_start for r in problem.readers[problem.candidates[k].storage])]
        cheap = frozenset(k for k in free if g.kinds[problem.candidates[k].nodes[0]] != "matmul")
        levels = [frozenset()]
        for option in (cheap, frozenset(free)):
            if option != levels[-1]:
                levels.append(option)
        options.append(levels)
    return problem, options


def pool_of(options) -> list[int]:
    return sorted({i for block in options for option in block for i in option})


def budget_range(problem: RecomputeProblem, options) -> tuple[int, int]:
    """The least peak a chain point or the whole pool reaches, and the peak keeping everything."""
    keep = simulate(problem, ()).peak_bytes
    points = [pool_of(options)]
    for level in range(1, max((len(b) for b in options), default=1)):
        points.append(sorted({i for b in options for i in b[min(level, len(b) - 1)]}))
    return min([keep] + [simulate(problem, p).peak_bytes for p in points]), keep


def check_against_exact(problem, options, budget, *, time_limit_s=10.0, exact_s=60.0, must_finish=True):
    """(i) the fast plan fits, (ii) it costs at most 1% more than the optimum, (iii) the bounds hold.

    The yardstick is the exact search over every candidate (the fast search may take any, not only the
    options'). ``must_finish=False``: where it runs out of ``exact_s``, the best plan it found instead.
    """
    fast = solve_blocks(problem, options, budget, time_limit_s=time_limit_s)
    exact = solve_exact(problem, budget, time_limit_s=exact_s,
                        incumbent=fast.chosen if fast.status != "infeasible" else None)
    assert exact.status in (("optimal", "infeasible") if must_finish else ("optimal", "infeasible", "feasible")), \
        exact.status
    if exact.status == "infeasible":
        assert fast.status == "infeasible"
        return fast, exact
    assert fast.status in ("optimal", "feasible")
    sim = simulate(problem, fast.chosen)
    assert sim.peak_bytes == fast.peak_bytes <= budget
    assert sim.cost_s == fast.cost_s
    assert fast.cost_s <= exact.cost_s * TOLERANCE + 1e-12, (fast.cost_s / exact.cost_s, budget)
    assert lower_bound(problem, budget) <= exact.cost_s * (1 + 1e-9) + 1e-15
    assert fast.lower_bound_s <= exact.cost_s * (1 + 1e-9) + 1e-15
    if fast.status == "optimal":
        assert fast.cost_s <= fast.lower_bound_s * (1 + 1e-9)
    return fast, exact


# tier (a): a step small enough to know every byte


def _small_step() -> tuple[RecomputeProblem, dict[str, int]]:
    """Forward: a = f(x) (1000 B, 1 s), b = mm(a, w) (10 B, 50 s), t = g(b) (800 B, read by no backward op),
    c = h(t) (200 B, 1 s), loss = sum(c). Backward: seed, grad_c, grad_b (reads b), grad_a (reads a, w; 100 B),
    grad_w (reads a and c; an output)."""
    g = JointGraph()
    x, w = g.placeholder(100), g.placeholder(40)
    a = g.node((x,), made=(1000,), cost=1.0)
    b = g.node((a, w), made=(10,), cost=50.0)
    t = g.node((b,), made=(800,), cost=1.0)
    c = g.node((t,), made=(200,), cost=1.0)
    loss = g.node((c,), made=(4,))
    g.outputs.add(g.values[loss][0])
    backward_start = len(g.inputs)
    seed = g.node((loss,), made=(4,))
    grad_c = g.node((seed,), made=(200,))
    grad_b = g.node((grad_c, b), made=(10,))
    g.node((grad_b, a, w), made=(100,))
    grad_w = g.node((grad_b, a, c), made=(40,))
    g.outputs.add(g.values[grad_w][0])
    problem = g.problem(backward_start)
    assert [c.nodes for c in problem.candidates] == [(a,), (b,), (c,)]
    return problem, {"a": 0, "b": 1, "c": 2}


def test_hand_built_step_bytes_bound_and_choice():
    problem, k = _small_step()
    # keep everything: the peak is where c is made (x, w, a, b, t, c)
    assert simulate(problem, ()).peak_bytes == 140 + 1000 + 10 + 800 + 200
    # recompute a: gone from after b until its copy before grad_a, where the peak now is (x, w, the copy,
    # c, loss, grad_b, grad_a)
    assert simulate(problem, [k["a"]]).peak_bytes == 140 + 1000 + 200 + 4 + 10 + 100
    # recompute c: its copy waits for grad_w and keeps t alive until then: more than keeping c, at grad_b
    # (x, w, a, b, loss, grad_c, grad_b, t)
    assert simulate(problem, [k["c"]]).peak_bytes == 140 + 1000 + 10 + 4 + 200 + 10 + 800
    # recompute both: at c's copy, x, w, a's copy, loss, grad_b, t and c's copy
    assert simulate(problem, [k["a"], k["c"]]).peak_bytes == 140 + 1000 + 4 + 10 + 800 + 200
    budget = 1454
    # over by 696 B where c is made: a frees 1000 B there for 1 s, b 10 B for 50 s
    assert lower_bound(problem, budget) == pytest.approx(0.696, rel=1e-12)
    # the one option recomputes a and b; the plan keeps b, which the budget does not need; on a graph this
    # small the exact search finishes the job, so the plan is proven optimal (its bound is its cost)
    solution = solve_blocks(problem, [[frozenset(), frozenset((k["a"], k["b"]))]], budget)
    assert (solution.status, solution.chosen, solution.cost_s, solution.levels) == ("optimal", (k["a"],), 1.0, (1,))
    assert solution.lower_bound_s == 1.0
    exact = solve_exact(problem, budget, time_limit_s=5)
    assert (exact.status, exact.chosen, exact.cost_s) == ("optimal", (k["a"],), 1.0)


def test_no_chain_point_fits_but_a_candidate_plan_does():
    """The options recompute a with c, which keeps t alive: no point of the chain fits, a alone does."""
    problem, k = _small_step()
    solution = solve_blocks(problem, [[frozenset(), frozenset((k["a"], k["c"]))]], 1454)
    assert (solution.status, solution.chosen, solution.peak_bytes) == ("optimal", (k["a"],), 1454)
    # one segment with all three levels: the same
    levels = [frozenset(), frozenset((k["a"],)), frozenset(k.values())]
    assert solve_blocks(problem, [levels], 1454).chosen == (k["a"],)
    # no blocks at all: the candidate search still finds it (it may take any candidate, not only the options')
    unblocked = solve_blocks(problem, [], 1454)
    assert (unblocked.chosen, unblocked.peak_bytes) == ((k["a"],), 1454)
    # below what any plan reaches: infeasible, and the exact search proves it
    assert solve_blocks(problem, [levels], 1000).status == "infeasible"
    assert solve_exact(problem, 1000, time_limit_s=5).status == "infeasible"


# tier (b): random joint graphs


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**6), st.integers(1, 2), st.integers(3, 6), st.floats(0.0, 1.0))
def test_exact_search_is_brute_force(seed, blocks, per_block, fraction):
    problem, options = random_joint(seed, blocks, per_block)
    pool = pool_of(options)
    assume(len(pool) <= 9)
    low, high = budget_range(problem, options)
    budget = int(low + fraction * (high - low))
    best = None
    for k in range(len(pool) + 1):
        for subset in itertools.combinations(pool, k):
            sim = simulate(problem, subset)
            if sim.peak_bytes <= budget and (best is None or sim.cost_s < best):
                best = sim.cost_s
    exact = solve_exact(problem, budget, allowed=pool, time_limit_s=30)
    assert exact.status == "optimal" and exact.cost_s == best
    assert lower_bound(problem, budget, allowed=pool) <= best * (1 + 1e-9)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**6), st.integers(1, 4), st.integers(4, 14), st.floats(0.0, 1.0))
def test_fast_plan_fits_and_is_within_one_percent_of_the_optimum(seed, blocks, per_block, fraction):
    problem, options = random_joint(seed, blocks, per_block)
    low, high = budget_range(problem, options)
    check_against_exact(problem, options, int(low + fraction * (high - low)))


@pytest.mark.parametrize("seed", [3, 11, 29])
def test_fast_plan_is_within_one_percent_on_graphs_of_about_300_nodes(seed):
    problem, options = random_joint(seed, 5, 25)
    assert 250 <= len(problem.inputs) <= 330
    low, high = budget_range(problem, options)
    for fraction in (0.05, 0.5, 0.9):
        check_against_exact(problem, options, int(low + fraction * (high - low)))


# tier (c): real models, and scale


REAL = {
    "mlp": lambda: examples.mlp(depth=4, width=64, batch=256),  # (at batch 32 the peak is not activations)
    "gpt2": lambda: examples.gpt2(layers=2, width=64, heads=2, seq=32, batch=2),
    "llama": lambda: examples.llama(layers=1, width=64, heads=2, seq=32, batch=2),
    "llama-2": lambda: examples.llama(layers=2, width=64, heads=2, seq=32, batch=2),
}


@functools.lru_cache(maxsize=None)
def real_problem(name: str):
    """The problem and options the remat pass hands the solver for the model (caught on the way in)."""
    workload = REAL[name]()
    step = capture(workload.build(), workload.inputs(), loss_fn=workload.loss_fn)
    seen = {}
    real = remat_fast.solve_blocks

    def spy(problem, options, budget_bytes, **kwargs):
        seen.update(problem=problem, options=options)
        return real(problem, options, budget_bytes, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(remat_fast, "solve_blocks", spy)
        remat_plan.plan_recompute(step, storage_table(step), get_device("h100"), 10**15, constant_bytes=0,
                                  floor_bytes=0)
    return seen["problem"], seen["options"]


@pytest.mark.parametrize("name", ["mlp", "gpt2", "llama"])
def test_fast_plan_is_within_one_percent_on_real_models(name):
    problem, options = real_problem(name)
    assert len(problem.inputs) <= 360
    low, high = budget_range(problem, options)
    assert low < high  # activations matter at this size
    for fraction in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9):
        # on the 1-layer llama the search over every candidate does not always finish in a few seconds
        check_against_exact(problem, options, int(low + fraction * (high - low)), time_limit_s=2.0, exact_s=3.0,
                            must_finish=False)


def test_fast_plan_on_a_two_layer_llama_is_within_one_percent_of_the_best_known():
    """549 nodes, 104 candidates: the exact search does not always finish here; whatever it finds, given
    a few seconds and the fast plan to start from, is no more than 1% cheaper."""
    problem, options = real_problem("llama-2")
    low, high = budget_range(problem, options)
    for fraction in (0.5, 0.9):
        budget = int(low + fraction * (high - low))
        fast = solve_blocks(problem, options, budget)
        assert fast.status in ("optimal", "feasible")
        assert simulate(problem, fast.chosen).peak_bytes == fast.peak_bytes <= budget
        assert fast.lower_bound_s <= fast.cost_s
        exact = solve_exact(problem, budget, allowed=pool_of(options), time_limit_s=6, incumbent=fast.chosen)
        assert exact.status in ("optimal", "feasible")
        assert fast.cost_s <= exact.cost_s * TOLERANCE + 1e-12, (fast.cost_s / exact.cost_s, fraction)


def test_ten_thousand_nodes_within_the_time_limit():
    problem, options = random_joint(1, 80, 60)
    assert len(problem.inputs) > 10_000 and len(problem.candidates) > 2000
    low, high = budget_range(problem, options)
    for fraction in (0.05, 0.5):
        budget = int(low + fraction * (high - low))
        solution = solve_blocks(problem, options, budget, time_limit_s=5.0)
        assert solution.status in ("optimal", "feasible")
        assert solution.seconds <= 5.0
        assert simulate(problem, solution.chosen).peak_bytes == solution.peak_bytes <= budget
        assert solution.lower_bound_s <= solution.cost_s
