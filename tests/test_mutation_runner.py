"""`make mutation` (tests/mutation.py) stays usable: its catalogue matches the code, and one mutant run end to
end is killed (the full run takes minutes and is not part of the suite)."""
from __future__ import annotations

import pathlib

import mutation

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_catalogue_matches_the_code():
    assert mutation.check_catalogue(mutation.MUTANTS) == []
    for m in mutation.MUTANTS:
        for test in m.tests:
            assert (ROOT / test.split("::")[0]).is_file(), f"{m.name}: no {test}"


def test_random_mutants_are_seeded():
    names = [m.name for m in mutation.random_mutants(7, 4)]
    assert len(names) == 4 and names == [m.name for m in mutation.random_mutants(7, 4)]


def test_one_mutant_is_killed_on_a_copy():
    m = next(m for m in mutation.MUTANTS if "filter direction" in m.name)
    report = mutation.run([m], timeout=120, log=lambda line: None)
    assert report["baseline_ok"]
    assert [(r[0].name, r[1]) for r in report["results"]] == [(m.name, "killed")]
    assert "kept = [v.direction_to_vtl0" not in (ROOT / m.path).read_text()  # the tree itself untouched
