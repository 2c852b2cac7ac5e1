"""The marks `make test-fast` deselects by say what each test needs (conftest.py sets them
from the fixtures a test takes): nothing it keeps builds the demo model, starts Prefect or
starts vLLM."""

from __future__ import annotations

from conftest import needed_marks


def test_marks_say_what_each_test_needs(request):
    items = request.session.items
    assert any(i.name == "test_marks_say_what_each_test_needs" for i in items)
    for item in items:
        missing = needed_marks(item) - {m.name for m in item.iter_markers()}
        assert not missing, f"{item.nodeid} needs what {sorted(missing)} marks, but is not marked so"
