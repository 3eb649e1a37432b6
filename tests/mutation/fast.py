"""pytest plugin of the mutation runs (tests/mutation/run.py loads it with -p fast).

Always: keeps a test file's fast math tests and deselects the end-to-end ones, i.e. every test whose body or
(transitive) fixtures run a script (run_script, a method's main, fid.report), train, go through common.load_teacher
(which trains a missing teacher) or use the smoke teacher; a main run under conftest's MainSpy (no training, no
evaluation) counts as fast.
FEWSTEP_MUT_TRACE=FILE (the unmutated baseline run): records, for the module FEWSTEP_MUT_MODULE, which of its
lines each test executes, and each test's duration, into FILE (JSON).
FEWSTEP_MUT_MAP=FILE (the mutant runs): finds the mutated lines by comparing FEWSTEP_MUT_MODULE with its pristine
copy FEWSTEP_MUT_PRISTINE and runs only the tests that execute them, fastest first (all tests when none does,
e.g. a module-level constant read at import)."""
import inspect
import io
import json
import os
import re
import sys
import textwrap
import time
import tokenize
from pathlib import Path

import pytest

# in tokens joined by spaces
SLOW = re.compile(r"run_script \(|\bmain \(|train_teacher \(|load_teacher \(|fid \. report \(|torchrun")


def _source(func):
    """func's code without its comments and strings (a docstring that mentions main() is not a call)."""
    try:
        text = textwrap.dedent(inspect.getsource(func))
        tokens = tokenize.generate_tokens(io.StringIO(text).readline)
        return " ".join(t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.STRING))
    except (OSError, TypeError, tokenize.TokenError, SyntaxError):
        return ""


def _slow(item):
    fixtures = getattr(item, "_fixtureinfo", None)
    seen, todo = set(), list(getattr(fixtures, "names_closure", []))
    texts = [_source(getattr(item, "function", None))]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name == "smoke_teacher":
            return True
        for fixturedef in fixtures.name2fixturedefs.get(name, ()):
            texts.append(_source(fixturedef.func))
    return any(SLOW.search(text) and "MainSpy (" not in text for text in texts)    # MainSpy: no training, no report


def _mutated_lines():
    now = Path(os.environ["FEWSTEP_MUT_MODULE"]).read_text().splitlines()
    old = Path(os.environ["FEWSTEP_MUT_PRISTINE"]).read_text().splitlines()
    lines = {i + 1 for i, (a, b) in enumerate(zip(old, now)) if a != b}
    if len(old) != len(now):                       # a mutation that changed the line count: from the first change on
        lines |= set(range(min(lines, default=min(len(old), len(now)) + 1), max(len(old), len(now)) + 1))
    return lines


def pytest_collection_modifyitems(config, items):
    drop = [item for item in items if _slow(item)]
    if "FEWSTEP_MUT_MAP" in os.environ:
        cover = json.loads(Path(os.environ["FEWSTEP_MUT_MAP"]).read_text())
        lines = _mutated_lines()
        needed = {t for t, rec in cover.items() if lines & set(rec["lines"])}
        keep = [item for item in items if item not in drop and (not needed or item.nodeid in needed)]
        drop = [item for item in items if item not in keep]
        keep.sort(key=lambda item: cover.get(item.nodeid, {}).get("seconds", 1e9))
        items[:] = keep
    else:
        items[:] = [item for item in items if item not in drop]
    if drop:
        config.hook.pytest_deselected(items=drop)


_RECORD = {}


def _traced(item):
    """Trace the module's executed lines while item's setup or call phase runs (FEWSTEP_MUT_TRACE)."""
    module = str(Path(os.environ["FEWSTEP_MUT_MODULE"]).resolve())
    rec = _RECORD.setdefault(item.nodeid, dict(lines=set(), seconds=0.0))

    def local(frame, event, arg):
        if event == "line":
            rec["lines"].add(frame.f_lineno)
        return local

    def tracer(frame, event, arg):
        if frame.f_code.co_filename == module:
            rec["lines"].add(frame.f_lineno)
            return local
        return None

    start = time.perf_counter()
    sys.settrace(tracer)
    return lambda: (sys.settrace(None), rec.__setitem__("seconds", rec["seconds"] + time.perf_counter() - start))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    stop = _traced(item) if "FEWSTEP_MUT_TRACE" in os.environ else None
    yield
    if stop:
        stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    stop = _traced(item) if "FEWSTEP_MUT_TRACE" in os.environ else None
    yield
    if stop:
        stop()


def pytest_sessionfinish(session):
    if "FEWSTEP_MUT_TRACE" in os.environ:
        out = {k: dict(lines=sorted(v["lines"]), seconds=v["seconds"]) for k, v in _RECORD.items()}
        Path(os.environ["FEWSTEP_MUT_TRACE"]).write_text(json.dumps(out))
