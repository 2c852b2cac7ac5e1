"""The marks `make test-fast` deselects by say what each test needs (conftest.py sets them
from the fixtures a test takes): nothing it keeps builds the demo model, starts Prefect or
starts vLLM."""

from __future__ import annotations

from conftest import FIXTURE_MARKS, needs_serving


def test_marks_say_what_each_test_needs(request):
    items = request.session.items
    assert any(i.name == "test_marks_say_what_each_test_needs" for i in items)
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        for fixture, mark in FIXTURE_MARKS.items():
            if fixture in item.fixturenames:
                assert mark in marks, f"{item.nodeid} takes {fixture} but is not marked {mark}"
        if any(m.kwargs.get("reason") == needs_serving.kwargs["reason"] for m in item.iter_markers("skipif")):
            assert "serving" in marks, f"{item.nodeid} needs the serving environment but is not marked serving"
