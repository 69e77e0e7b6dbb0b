"""memopt's fusion window: Inductor's heuristics with no fusion of nodes far apart in the plan's order."""

from types import SimpleNamespace

import torch
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V

from memopt.codegen.fusion import FUSION_WINDOW, PlanOrderChoices, inductor_patches


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
            assert "PlanOrderChoices(window=4)" in str(inductor_config.save_config_portable())
    assert not isinstance(V.choices, PlanOrderChoices)


def test_compile_program_asks_the_window_which_fusions_to_make(monkeypatch):
    from memopt.codegen.inductor import compile_program

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
    for options, answers in (({}, []), ({FUSION_WINDOW: 1}, [True]), ({FUSION_WINDOW: 0}, [False])):
        asked.clear()
        program = compile_program([y, w], [x], [w], held=[True], options={"fx_graph_cache": False, **options})
        (result,) = program.fn([value])
        torch.testing.assert_close(result, value - value.sum(1, keepdim=True))
        assert sorted(set(asked)) == answers, options
