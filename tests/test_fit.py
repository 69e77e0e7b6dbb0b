"""The one loop from plan to running step (``memopt.fit``), with stand-in plans and a stand-in lowering.

A stand-in lowering compiles nothing: the peaks of a plan's two programs come from a table keyed by
(the target the plan was made for, the options it is compiled under), entry bytes (100) included.
"""

from types import SimpleNamespace

import pytest

import memopt
from memopt.fit import Budget, fit
from memopt.lower.inductor import FALLBACK_OPTIONS, InductorBudgetError
from memopt.lower.lowering import FXLowering, Lowered

VARIANTS = ({}, *FALLBACK_OPTIONS)


class _TableLowering:
    """Inductor's search knobs over a table of peaks; ``log`` keeps (target, options, programs reused)."""

    name = "stand-in"
    variants = VARIANTS
    reads_code = True
    code_slack = 0.0  # the table's peaks are exact
    replans = 2

    def __init__(self, table, *, reclaims=True):
        self.table, self.reclaims, self.log = table, reclaims, []

    def lower(self, plan, options, *, reuse, limit):
        kept = (reuse is not None and reuse.forward_peak_bytes <= limit,
                reuse is not None and reuse.backward_peak_bytes <= limit)
        self.log.append((plan.target, dict(options), kept))
        forward, backward = (100 + p for p in self.table[(plan.target, tuple(options.items()))])
        return Lowered(plan, None, None, forward, backward, max(forward, backward), dict(options), 0.0)

    def infeasible(self, budget, lowest, attempts, below):
        return InductorBudgetError(budget, lowest, attempts, below)


def _plan_at(target, *, smallest=0, choices=None, held=0):
    """A stand-in plan for ``target``; below ``smallest``, the error names the whole budget (``held`` on top)."""
    if target < smallest:
        raise memopt.BudgetInfeasibleError(target + held, smallest + held, "somewhere")
    return SimpleNamespace(target=target, choices=choices, chunked=(), chunked_mlp=())


def _key(target, variant):
    return (target, tuple(VARIANTS[variant].items()))


def _fit(table, budget, *, smallest=0, reclaims=False, headroom=0.02):
    lowering = _TableLowering(table, reclaims=reclaims)
    fitted = fit(lambda t: _plan_at(t, smallest=smallest), Budget(budget, headroom), lowering)
    return fitted, lowering


def test_over_the_budget_the_offending_passes_go_off_and_only_the_program_over_is_recompiled():
    table = {_key(1000, 0): (500, 1100), _key(1000, 1): (500, 850)}
    fitted, lowering = _fit(table, 1000)
    assert [a.predicted_peak_bytes for a in fitted.attempts] == [1200, 950]
    assert fitted.attempts[1].options == FALLBACK_OPTIONS[0] and fitted.attempts[1].chosen
    assert [kept for _, _, kept in lowering.log] == [(False, False), (True, False)]


def test_when_no_pass_helps_memopt_replans_for_the_excess_then_a_little_above_then_gives_up_typed():
    table = {_key(1000, r): (500, p) for r, p in enumerate((1100, 1000, 998, 995, 990))}  # best: 1090, over by 90
    table[_key(910, 4)] = (500, 850)  # the plan for 1000 - 90 fits, with the best variant straight away
    fitted, _ = _fit(table, 1000)
    assert [(a.target_bytes, a.predicted_peak_bytes) for a in fitted.attempts] == [
        (1000, 1200), (1000, 1100), (1000, 1098), (1000, 1095), (1000, 1090), (910, 950)]

    for target in (1050, 1100, 1200):  # the plans for a little more: their code is over the budget too,
        table[_key(target, 0)] = (500, 960)  # with the caller's options and with the variant that came closest
        table[_key(target, 4)] = (500, 950)
    with pytest.raises(InductorBudgetError) as info:
        _fit(table, 1000, smallest=1000, reclaims=True)
    # the error is a BudgetInfeasibleError whose minimum is the lowest peak the code reached
    assert isinstance(info.value, memopt.BudgetInfeasibleError)
    assert info.value.predicted == info.value.minimum == 1050 and "raise the budget to at least" in str(info.value)
    assert [(a.target_bytes, a.options) for a in info.value.attempts][-6:] == [
        (t, options) for t in (1050, 1100, 1200) for options in ({}, FALLBACK_OPTIONS[3])]
    # the code of the plan for 10% more fits: that step is kept
    table[_key(1100, 4)] = (500, 880)
    fitted, _ = _fit(table, 1000, smallest=1000, reclaims=True)
    assert fitted.lowered.plan.target == 1100 and fitted.lowered.peak_bytes == 980


def test_below_the_smallest_plan_the_code_of_the_plans_at_and_above_it_may_still_fit():
    # the smallest plan's code: 1090 at best; the plan for 5% more compiles to code peaking at 960
    table = {_key(1000, r): (500, p) for r, p in enumerate((1100, 1000, 998, 995, 990))}
    table.update({_key(t, 0): (500, 900) for t in (1050, 1100, 1200)})
    table.update({_key(1050, 4): (500, 860), _key(1100, 4): (500, 950), _key(1200, 4): (500, 950)})
    fitted, _ = _fit(table, 970, smallest=1000, reclaims=True)
    assert fitted.lowered.plan.target == 1050 and fitted.lowered.peak_bytes == 960
    # the variants at the smallest plan, no plan below it, then the plans above it: the caller's options first
    assert [(a.target_bytes, a.predicted_peak_bytes) for a in fitted.attempts] == [
        (1000, 1200), (1000, 1100), (1000, 1098), (1000, 1095), (1000, 1090), (1050, 1000), (1050, 960)]
    table[_key(1050, 0)] = (500, 850)  # with the caller's options, the code of the plan for 5% more fits
    fitted, _ = _fit(table, 970, smallest=1000, reclaims=True)
    assert fitted.lowered.plan.target == 1050 and fitted.lowered.peak_bytes == 950
    assert fitted.attempts[-1].options == {}
    # nothing fits: the minimum is the lowering's own (950, what its code reached), not the plans' (1000)
    with pytest.raises(memopt.BudgetInfeasibleError) as info:
        _fit(table, 900, smallest=1000, reclaims=True)
    assert info.value.budget == 900 and info.value.minimum == 950 and info.value.proven_minimum == 1000
    assert "950 B at best after 11 compile(s)" in str(info.value)
    # and at the minimum it reports, the same search finds the step that meets it
    fitted, _ = _fit(table, 950, smallest=1000, reclaims=True)
    assert fitted.lowered.peak_bytes <= 950


def test_budget_left_unused_by_the_code_is_planned_for_once_more():
    # the code peaks at 700 of 1000 (limit 980 with 2% headroom): 280 spare, so plan for 1280
    table = {_key(1000, 0): (500, 600), _key(1280, 0): (500, 880)}
    fitted, _ = _fit(table, 1000, reclaims=True)
    assert fitted.lowered.plan.target == 1280 and fitted.lowered.peak_bytes == 980
    assert [(a.target_bytes, a.predicted_peak_bytes, a.chosen) for a in fitted.attempts] == [
        (1000, 700, False), (1280, 980, True)]
    # the second plan's code leaves 100 unused (over 1% of the budget): a third plan, for 1280 + 100
    table.update({_key(1280, 0): (500, 780), _key(1380, 0): (500, 875)})
    fitted, _ = _fit(table, 1000, reclaims=True)
    assert fitted.lowered.plan.target == 1380 and fitted.lowered.peak_bytes == 975
    assert [(a.target_bytes, a.predicted_peak_bytes) for a in fitted.attempts] == [
        (1000, 700), (1280, 880), (1380, 975)]
    # little to spare (5, under 1% of the budget): no second plan
    fitted, _ = _fit({_key(1000, 0): (500, 875)}, 1000, reclaims=True)
    assert fitted.lowered.plan.target == 1000 and len(fitted.attempts) == 1 and fitted.attempts[0].chosen
    # a lowering that does not reclaim stops at the first step that fits
    fitted, _ = _fit(table, 1000, reclaims=False)
    assert len(fitted.attempts) == 1


class _Code(dict):
    """A table from a function of the plan's target: the code's peak (entry bytes included)."""

    def __init__(self, peak):
        super().__init__()
        self.peak = peak

    def __missing__(self, key):
        return (0, self.peak(key[0]) - 100)


def test_reclaim_searches_between_the_largest_plan_whose_code_fit_and_the_smallest_whose_code_did_not():
    # the code peaks 300 under plans up to 1200, 250 under larger ones (a plan whose code is worse)
    fitted, _ = _fit(_Code(lambda target: target - (300 if target <= 1200 else 250)), 1000, reclaims=True)
    # 1000 + 280 spare is over; where the line through (1000, 700) and (1280, 1030) meets 980: 1237, over;
    # two over in a row: halfway, 1118, fits; the line through (1118, 818) and (1237, 987), kept 10 (1% of
    # the budget) inside: 1227, fits; the next step is under 10
    assert [(a.target_bytes, a.predicted_peak_bytes) for a in fitted.attempts] == [
        (1000, 700), (1280, 1030), (1237, 987), (1118, 818), (1227, 977)]
    assert fitted.lowered.plan.target == 1227 and fitted.lowered.peak_bytes == 977
    assert [a.chosen for a in fitted.attempts] == [False, False, False, False, True]
    # every larger plan's code over: the first step stays, after RECLAIM_COMPILES (6) more compiles
    fitted, _ = _fit(_Code(lambda target: 700 if target == 1000 else 990), 1000, reclaims=True)
    assert [a.target_bytes for a in fitted.attempts] == [1000, 1280, 1270, 1135, 1067, 1033, 1016]
    assert fitted.lowered.plan.target == 1000 and fitted.lowered.peak_bytes == 700 and fitted.attempts[0].chosen


def test_reclaim_compiles_no_plan_twice_and_stops_at_one_that_recomputes_nothing():
    targets = []

    def plan_at(target):  # recomputes "a" under 1300, nothing from there on
        targets.append(target)
        return _plan_at(target, choices=(("a", "recompute"),) if target < 1300 else ())

    lowering = _TableLowering(_Code(lambda target: 700 if target < 1300 else 970))
    fitted = fit(plan_at, Budget(1000, 0.02), lowering)
    # the plan for 1280 is the plan for 1000 (no compile); from it, 280 more: 1560 keeps all, and ends it
    assert targets == [1000, 1280, 1560]
    assert [(a.target_bytes, a.predicted_peak_bytes, a.chosen) for a in fitted.attempts] == [
        (1000, 700, False), (1560, 970, True)]


class _PlanPeaks(_TableLowering):
    """Each stand-in plan carries its code's peak."""

    def __init__(self):
        super().__init__({})

    def lower(self, plan, options, *, reuse, limit):
        self.log.append((plan.target, bool(plan.chunked)))
        return Lowered(plan, None, None, 100, plan.peak, plan.peak, dict(options), 0.0)


def _sliced_or_whole(whole_seconds, *, forced=False):
    """Plans that slice a loss head (their code 20 under their target) and, asked to slice nothing, plans whose
    code holds 300 less than they count, recomputing "a" under 1250 and nothing from there on."""

    def plan_at(target, *, sliced=True):
        if sliced or forced:
            return SimpleNamespace(target=target, peak=target - 20, choices=(("head", "chunked x8"),),
                                   chunked=("head",), chunked_mlp=(), modelled_seconds=2.0)
        choices = (("a", "recompute"),) if target < 1250 else ()
        return SimpleNamespace(target=target, peak=target - 300, choices=choices, chunked=(), chunked_mlp=(),
                               modelled_seconds=whole_seconds + (0.5 if choices else 0.0))

    return plan_at


def test_where_the_plan_slices_by_choice_the_plans_slicing_nothing_are_searched_too_and_the_faster_runs():
    lowering = _PlanPeaks()
    fitted = fit(_sliced_or_whole(1.0), Budget(1000, 0.02), lowering)
    # the sliced plan for 1000 fits with nothing to spare; the whole one for 1000 leaves 280, and the one for
    # 1280 recomputes nothing and fits: by the cost model the fastest
    assert lowering.log == [(1000, True), (1000, False), (1280, False)]
    assert fitted.lowered.plan.target == 1280 and not fitted.lowered.plan.chunked
    assert [a.chosen for a in fitted.attempts] == [False, False, True]
    # slower by the cost model: the sliced plan runs
    fitted = fit(_sliced_or_whole(3.0), Budget(1000, 0.02), _PlanPeaks())
    assert fitted.lowered.plan.chunked and fitted.attempts[0].chosen
    # sliced because the config says so: asked to slice nothing, the plan is the same, and nothing is compiled
    lowering = _PlanPeaks()
    fitted = fit(_sliced_or_whole(1.0, forced=True), Budget(1000, 0.02), lowering)
    assert lowering.log == [(1000, True)] and fitted.lowered.plan.chunked


def test_what_is_held_beside_the_step_comes_off_its_share_and_onto_the_minimum_reported():
    # the rest of the model holds 300 of the 1300 budget: the step plans for 1000, and an error names the whole
    table = {_key(1000, r): (500, 1100) for r in range(len(VARIANTS))}
    table.update({_key(t, r): (500, 1100) for t in (1050, 1100, 1200) for r in (0, 4)})
    lowering = _TableLowering(table)
    with pytest.raises(InductorBudgetError) as info:
        fit(lambda t: _plan_at(t, smallest=1000, held=300), Budget(1300, 0.02, held_elsewhere_bytes=300), lowering)
    assert lowering.log[0][0] == 1000
    assert info.value.budget == 1300 and info.value.minimum == 1200 + 300


class _Arena:
    """Plans whose arena leaves the step over its target by a fixed amount (what the FX lowering reads)."""

    def __init__(self, over):
        self.over, self.targets = over, []

    def __call__(self, target):
        self.targets.append(target)
        return SimpleNamespace(program=None, peak_bytes=target - 20 + self.over, phase_peaks=(0, 0), choices=None)


def test_the_fx_lowering_plans_again_for_less_while_its_planned_peak_is_over_the_planned_part(monkeypatch):
    monkeypatch.setattr("memopt.lower.lowering.StepRunner", lambda program: None)
    plans = _Arena(over=50)  # the plan for t peaks at t + 30: over the planned part (980) of 1000 by 50
    fitted = fit(plans, Budget(1000, 0.02), FXLowering(arena=True))
    assert plans.targets == [1000, 950] and fitted.lowered.peak_bytes == 980
    # never under: a typed error with the budget that the lowest peak found needs, the attempts named
    with pytest.raises(memopt.BudgetInfeasibleError, match="layout=False") as info:
        fit(_GrowingArena(), Budget(1000, 0.02), FXLowering(arena=True))
    assert info.value.minimum > 1000


class _GrowingArena(_Arena):
    def __init__(self):
        super().__init__(over=0)

    def __call__(self, target):
        self.targets.append(target)
        return SimpleNamespace(program=None, peak_bytes=1100, phase_peaks=(0, 0), choices=None)


class _ArenaAbove(_Arena):
    """Plans from ``smallest`` up, each lowered ``over`` above its target."""

    def __init__(self, over, smallest):
        super().__init__(over)
        self.smallest = smallest

    def __call__(self, target):
        if target < self.smallest:
            raise memopt.BudgetInfeasibleError(target, self.smallest, "the smallest plan")
        self.targets.append(target)
        return SimpleNamespace(program=None, peak_bytes=target + self.over, phase_peaks=(0, 0), choices=None)


@pytest.mark.parametrize("over", [30, 130])
def test_a_lowering_reports_its_own_minimum_and_fits_at_it(monkeypatch, over):
    monkeypatch.setattr("memopt.lower.lowering.StepRunner", lambda program: None)
    # below every plan: the smallest plan's arena is over what the plans' minimum leaves, so more is named
    with pytest.raises(memopt.BudgetInfeasibleError) as info:
        fit(_ArenaAbove(over, 900), Budget(1, 0.02), FXLowering(arena=True))
    minimum = info.value.minimum
    assert minimum > 900 and info.value.proven_minimum == 900
    # at that minimum the loop plans again for less, down to the smallest plan, and fits
    plans = _ArenaAbove(over, 900)
    fitted = fit(plans, Budget(minimum, 0.02), FXLowering(arena=True))
    assert plans.targets[-1] == 900 and fitted.lowered.peak_bytes == 900 + over
    with pytest.raises(memopt.BudgetInfeasibleError):
        fit(_ArenaAbove(over, 900), Budget(minimum - 1, 0.02), FXLowering(arena=True))


def test_below_every_plan_the_fx_lowering_names_the_plans_own_minimum(monkeypatch):
    monkeypatch.setattr("memopt.lower.lowering.StepRunner", lambda program: None)
    with pytest.raises(memopt.BudgetInfeasibleError) as info:
        fit(_ArenaAbove(-20, 900), Budget(500, 0.02), FXLowering())
    assert info.value.minimum == 900 and info.value.where == "the smallest plan"
