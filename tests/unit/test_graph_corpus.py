"""Every graph in ``graphs/`` is valid; every graph in ``invalid_graphs/`` fails with the problems it declares.

Each invalid graph states what it expects in its header comments:

    # expect: LINE FIELD: MESSAGE   a problem at LINE (``-``: none) naming FIELD (``-``: none) whose
                                    message contains MESSAGE
    # absent: FIELD                 no problem names exactly FIELD (a duplicate or misplaced report)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.errors import SpecError
from engine.plan.check import check_graph
from engine.spec.load import load_graph

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "invalid_graphs"
VALID = sorted((ROOT / "graphs").glob("*.yaml"))
INVALID = sorted(CORPUS.glob("*.yaml"))

_EXPECT = re.compile(r"^#\s*expect:\s*(?P<line>\d+|-)\s+(?P<field>\S+):\s(?P<message>.+)$")
_ABSENT = re.compile(r"^#\s*absent:\s*(?P<field>\S+)\s*$")


@dataclass(frozen=True)
class Expected:
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line} {self.field or '(no field)'}: ...{self.message}..."


def expectations(path: Path) -> tuple[list[Expected], list[str]]:
    expected, absent = [], []
    for text in path.read_text().splitlines():
        if match := _EXPECT.match(text):
            line = None if match["line"] == "-" else int(match["line"])
            field = "" if match["field"] == "-" else match["field"]
            expected.append(Expected(line, field, match["message"].strip()))
        elif match := _ABSENT.match(text):
            absent.append(match["field"])
    return expected, absent


def check(path: Path) -> None:
    check_graph(load_graph(path))


def test_corpus_is_large_and_every_file_declares_its_expectation() -> None:
    assert len(INVALID) >= 30
    for path in INVALID:
        expected, _ = expectations(path)
        assert expected, f"{path.name} has no `# expect:` line"


@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
def test_shipped_graph_validates(path: Path) -> None:
    checked = check_graph(load_graph(path))
    assert set(checked.node_of) == set(checked.stages)  # every stage placed
    assert checked.segments


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_graph_reports_its_problems(path: Path) -> None:
    expected, absent = expectations(path)
    with pytest.raises(SpecError) as caught:
        check(path)
    problems = caught.value.problems
    shown = "\n".join(f"  {p.line} {p.field!r}: {p.message}" for p in problems)
    for want in expected:
        assert any(
            p.line == want.line and p.field == want.field and want.message in p.message for p in problems
        ), f"{path.name}: expected {want}; got\n{shown}"
    for field in absent:
        assert not any(p.field == field for p in problems), f"{path.name}: unexpected problem at {field}; got\n{shown}"
    for problem in problems:  # every problem names this file and says something
        assert problem.file == str(path) and problem.message
    assert len(set(problems)) == len(problems), f"{path.name}: a problem is reported twice:\n{shown}"
    # the message a user sees lists every problem with file:line
    text = str(caught.value)
    for want in expected:
        where = f"{path}:{want.line}" if want.line is not None else str(path)
        assert where in text
