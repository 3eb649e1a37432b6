"""The mutation-testing configuration (tests/mutation, a development check) follows the code it names: every scope name
of a config is a function, method or constant of its file, and every survivor judged equivalent (equivalent.md) names a
line that is still in its file. Moving or renaming code without updating them fails here, not hours into a run."""
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "mutation"))
import run  # noqa: E402

CONFIGS = sorted((ROOT / "tests" / "mutation").glob("*.toml"))


def test_every_method_file_and_fid_has_a_config():
    assert sorted(p.stem for p in CONFIGS) == ["cd", "cfd", "common", "fid", "pd", "sfd", "sfddm", "sferd"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_scope_names_exist_in_the_file(config):
    cfg = tomllib.loads(config.read_text())["cosmic-ray"]
    assert cfg["module-path"] == f"{config.stem}.py" and f"tests/test_{config.stem}.py" in cfg["test-command"]
    names = cfg["filters"]["fewstep-scope"]["names"]
    ranges = run.scope_lines(ROOT / cfg["module-path"], names)            # exits naming any name the file lacks
    assert len(ranges) >= len(names)


def test_equivalent_rows_name_lines_that_exist():
    known = run.equivalents()
    assert len(known) > 50
    missing = [(file, line) for file, _, line in known
               if line not in {run.code(text) for text in (ROOT / file).read_text().splitlines()}]
    assert missing == []


def test_equivalent_rows_match_by_operator_line_and_part():
    known = {("x.py", "core/NumberReplacer", "y = a[1] + 2"): ["a[ 0]"], ("x.py", "core/AddNot", "if a:"): [None]}
    diff = "--- a/x.py\n+++ b/x.py\n-    y = a[1] + 2\n+    y = a[ 0] + 2\n"
    assert run.is_equivalent(known, "x.py", "core/NumberReplacer", "    y = a[1] + 2  # note", diff)
    assert not run.is_equivalent(known, "x.py", "core/NumberReplacer", "y = a[1] + 2", diff.replace("a[ 0] + 2", "a[1] + 3"))
    assert not run.is_equivalent(known, "x.py", "core/ReplaceBinaryOperator_Add_Sub", "y = a[1] + 2", diff)
    assert run.is_equivalent(known, "x.py", "core/AddNot", "if a:", "+    if not a:")
