"""Every family of tests/families.py, through every stage (tests/support.py), gives what docs/SUPPORT.md says:
✓ where it says ✓ (convert and load exact, a training step, an export validated against PyTorch, ONNX Runtime
equal to PyTorch), a one-line refusal where it says refused, and never an internal error. The matrix is made by
``python scripts/support_matrix.py`` from the same code, so a family that starts (or stops) working shows here."""

from __future__ import annotations

from pathlib import Path

import pytest
from families import FAMILIES
from support import STAGES, run_family

MATRIX = Path(__file__).resolve().parent.parent / "docs" / "SUPPORT.md"
MARKS = {"✓": "ok", "refused": "refused", "n/a": "n/a", "—": "skipped", "ERROR": "error"}


def documented() -> dict[str, dict[str, str]]:
    rows = {}
    for line in MATRIX.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(STAGES) + 2 and cells[0] not in ("family", "---") and cells[2] in MARKS:
            rows[cells[0]] = {s: MARKS[c] for s, c in zip(STAGES, cells[2:])}
    return rows


DOCUMENTED = documented()


def test_the_matrix_covers_every_family_and_shows_no_error():
    assert set(DOCUMENTED) == {f.name for f in FAMILIES}
    assert len(FAMILIES) >= 35
    assert not [(name, s) for name, row in DOCUMENTED.items() for s, v in row.items() if v == "error"]


def check(family, tmp_path) -> None:
    cells = run_family(family, tmp_path)
    got = {s: c.status for s, c in cells.items()}
    details = {s: c.detail for s, c in cells.items() if c.status in ("refused", "error")}
    assert got == DOCUMENTED[family.name], details
    for stage, detail in details.items():  # a refusal is one line that says which model and why
        assert detail and "internal error" not in detail and "\n" not in detail, (stage, detail)


# two classes, so that pytest-xdist's --dist loadscope gives each worker half of the families
class TestEvenFamilies:
    @pytest.mark.parametrize("family", FAMILIES[0::2], ids=lambda f: f.name)
    def test_does_what_the_matrix_says(self, family, tmp_path):
        check(family, tmp_path)


class TestOddFamilies:
    @pytest.mark.parametrize("family", FAMILIES[1::2], ids=lambda f: f.name)
    def test_does_what_the_matrix_says(self, family, tmp_path):
        check(family, tmp_path)
