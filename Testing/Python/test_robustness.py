"""Issue #7: bad input, faults and hostile files never lose a clinician's work.

Every case of ``robustness_cases.CASES`` (the corpus shared with ``benchmarks/robustness_report.py``) runs in
its own empty folder and must end in a correct result or a clear error, with every input file (and, for the
module, every scene node) unchanged and nothing written outside the output path and the cache dir. Cases
marked ``xfail`` need a fix in a file outside this change; their reason says which and where.
"""

from __future__ import annotations

import pytest
import robustness_cases as corpus
from robustness_cases import CASES, Outcome, run_case

try:
    import mrml_helpers

    HAS_MRML = mrml_helpers.HAS_MRML
except ImportError:  # pragma: no cover - mrml_helpers only imports slicer lazily
    HAS_MRML = False


def _param(case: corpus.Case):
    marks = []
    if case.needs_mrml:
        marks.append(pytest.mark.skipif(not HAS_MRML, reason="slicer-core (real MRML) is not installed"))
    if case.xfail:
        marks.append(pytest.mark.xfail(reason=case.xfail, strict=True))
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_case_ends_in_a_correct_result_or_a_clear_error(case, tmp_path, cache_dir):
    outcome = run_case(case, tmp_path, cache_dir)
    problems = outcome.problems()
    assert not problems, "\n".join([f"{case.name} ({case.entry}): {case.tried}", *problems, outcome.details[-3000:]])


def test_every_group_of_the_issue_is_covered():
    groups = {case.group for case in CASES}
    assert {"image files", "voxel values", "geometry", "label maps", "volume sizes", "model files",
            "adapted-model files", "output paths", "faults", "module"} <= groups
    assert {case.entry for case in CASES} == {"library", "CLI", "CLI (subprocess)", "module"}


def test_outcomes_are_judged_strictly(tmp_path):
    """The judge itself: a traceback, a wrong message, a changed input or a stray file is never accepted."""
    case = corpus.Case("judge", "library", "nothing", lambda ws: (lambda: None), message="clear")
    assert Outcome(case, "clear error", "a clear message").problems() == []
    assert Outcome(case, "clear error", "another message").problems()
    assert Outcome(case, "traceback", "KeyError: 'x'").problems()
    assert Outcome(case, "correct result", "done").problems()  # an error was expected
    assert Outcome(case, "clear error", "clear", inputs_changed=["image.nii.gz"]).problems()
    assert Outcome(case, "clear error", "clear", stray_files=["cwd/x"]).problems()


def test_the_runner_catches_tracebacks_hangs_and_changed_inputs(tmp_path):
    def changes_its_input(ws):
        path = ws.raw("image.nii.gz", b"original")
        return lambda: path.write_bytes(b"changed")

    def raises(ws):
        return lambda: {}["missing"]

    def hangs(ws):
        import time

        return lambda: time.sleep(30)

    outcome = run_case(corpus.Case("changes", "library", "", changes_its_input, expect="result"), tmp_path / "a")
    assert outcome.inputs_changed == ["image.nii.gz"]
    assert run_case(corpus.Case("raises", "library", "", raises), tmp_path / "b").kind == "traceback"
    hang = run_case(corpus.Case("hangs", "library", "", hangs, time_limit=0.5), tmp_path / "c")
    assert hang.kind == "hang"
