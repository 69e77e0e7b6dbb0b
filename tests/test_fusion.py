"""memopt's fusion window: Inductor's heuristics with no fusion of nodes far apart in the plan's order."""

from types import SimpleNamespace

import torch
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V

from memopt.lower.fusion import FUSION_WINDOW, PlanOrderChoices, inductor_patches


def _group(first, last):
    return SimpleNamespace(min_order=first, max_order=last)


def test_fusions_spanning_more_than_the_window_are_refused_and_the_rest_left_to_inductor(monkeypatch):
    asked = []
    monkeypatch.setattr(InductorChoices, "can_fuse",
                        staticmethod(lambda scheduler, a, b, score: asked.append((a, b)) or score > 0))
    choices = PlanOrderChoices(4)
    near, far, grouped = _group(2, 2), _group(7, 7), _group(3, 6)
    assert choices.can_fuse(None, _group(3, 3), near, 1)  # 1 apart: Inductor's own heuristics decide
    assert not choices.can_fuse(None, _group(3, 3), near, 0)
    assert not choices.can_fuse(None, near, far, 1)  # 5 apart: refused before Inductor is asked
    assert choices.can_fuse(None, grouped, _group(2, 2), 1)  # a fused group spans its nodes: 6 - 2 = 4
    assert not choices.can_fuse(None, grouped, _group(11, 11), 1)  # 11 - 3 = 8, either way round
    assert not choices.can_fuse(None, _group(11, 11), grouped, 1)
    assert len(asked) == 3
    assert PlanOrderChoices(4).uuid() != PlanOrderChoices(8).uuid()  # Inductor's cache tells them apart


def test_the_window_is_memopts_option_not_an_inductor_config_entry():
    with inductor_patches({"pattern_matcher": False}) as patches:
        assert patches == {"pattern_matcher": False}
        assert not isinstance(V.choices, PlanOrderChoices)
    with inductor_patches({"pattern_matcher": False, FUSION_WINDOW: 4}) as patches:
        assert FUSION_WINDOW not in patches and patches["pattern_matcher"] is False
        assert isinstance(V.choices, PlanOrderChoices) and V.choices.window == 4
        with inductor_config.patch(patches):  # Inductor takes the patches, and keys its cache on the window
            assert inductor_config.inductor_choices_class().uuid() == PlanOrderChoices(4).uuid()
            assert PlanOrderChoices(4).uuid() in str(inductor_config.save_config_portable())
    assert not isinstance(V.choices, PlanOrderChoices)


def test_compile_program_asks_the_window_which_fusions_to_make(monkeypatch):
    from memopt.lower.inductor import compile_program

    graph = torch.fx.Graph()  # x - x.sum(1): a reduction and the pointwise op reading it, 1 apart
    x = graph.placeholder("x")
    y = graph.call_function(torch.ops.aten.sum.dim_IntList, (x, [1], True))
    w = graph.call_function(torch.ops.aten.sub.Tensor, (x, y))
    graph.output((w,))
    value = torch.randn(16, 16)
    x.meta["val"], y.meta["val"], w.meta["val"] = value, value.sum(1, keepdim=True), value
    asked = []
    window_decides = PlanOrderChoices.can_fuse
    monkeypatch.setattr(PlanOrderChoices, "can_fuse",
                        lambda self, *args: asked.append(window_decides(self, *args)) or asked[-1])
    # no window (memopt compiles under PlanOrderChoices to keep its order): asked, and never refuses
    for options, answers in (({}, [True]), ({FUSION_WINDOW: 1}, [True]), ({FUSION_WINDOW: 0}, [False])):
        asked.clear()
        program = compile_program([y, w], [x], [w], held=[True], options={"fx_graph_cache": False, **options})
        (result,) = program.fn([value])
        torch.testing.assert_close(result, value - value.sum(1, keepdim=True))
        assert sorted(set(asked)) == answers, options


def test_kept_order_still_lets_inductor_reuse_freed_buffers():
    """Inductor's check that a reuse does not raise its peak reads sizes that only its peak-memory pass sets:
    with the pass off, every reuse between kernels not next to each other was refused. memopt runs the pass
    with nothing to reorder."""
    from memopt.lower.inductor import compile_program

    # a = x @ w, b = a @ w (a's last reader), c = sin(b) (in b's buffer), then d, e, f = c @ w, d @ w, e @ w,
    # all three returned: d can take a's buffer, two kernels after a's last reader, under the peak at the end
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    xv, wv = torch.randn(64, 64), torch.randn(64, 64) / 8  # products stay near 1
    x.meta["val"], w.meta["val"] = xv, wv
    nodes, last = [], x
    for op in ("mm", "mm", "sin", "mm", "mm", "mm"):
        args = (last, w) if op == "mm" else (last,)
        last = graph.call_function(getattr(torch.ops.aten, op).default, args)
        last.meta["val"] = getattr(torch, op)(*(arg.meta["val"] for arg in args))
        nodes.append(last)
    graph.output(tuple(nodes[3:]))
    with inductor_patches({"reorder_for_peak_memory": False}) as patches:
        assert patches["reorder_for_peak_memory"] is True and V.choices.kept_order
        with inductor_config.patch(patches):  # cached apart from compiles that reorder
            assert inductor_config.inductor_choices_class().uuid() != PlanOrderChoices().uuid()
    program = compile_program(nodes, [x, w], nodes[3:], held=[True, True],
                              options={"fx_graph_cache": False, "reorder_for_peak_memory": False})
    for result, node in zip(program.fn([xv, wv]), nodes[3:]):
        torch.testing.assert_close(result, node.meta["val"])
    # a, b and f allocate; c takes b's buffer, d a's, e c's (next to each other, so even without the pass,
    # which leaves d to allocate: 4)
    assert program.source.count("empty_strided_cpu(") == 3, program.source
