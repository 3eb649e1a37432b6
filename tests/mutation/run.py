"""Mutation testing of fewstep's math with cosmic-ray (a development check, not CI; see README.md here).

    OMP_NUM_THREADS=1 nice -n 19 python tests/mutation/run.py cd        # one file: cd.py against tests/test_cd.py
    python tests/mutation/run.py cd --report-only WORK                   # the score of a finished (or stopped) run

It copies the repository (tracked and untracked, not ignored files) into a scratch folder WORK (cosmic-ray
mutates the module in place there, never in the checkout), then: cosmic-ray init with tests/mutation/<name>.toml,
marks every mutant outside the file's scope (the functions and constants that config lists) and every excluded
operator as skipped, cosmic-ray exec, and prints the score: killed / (killed + survived - equivalent), where
equivalent is a survivor listed in tests/mutation/equivalent.md (by file, operator and the mutated line's code).
Surviving mutants are written to WORK/survivors.txt with their diffs."""
import argparse
import ast
import io
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import tokenize
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def copy_repo(work):
    r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    files = r.stdout.split() if r.returncode == 0 else [      # not a git checkout (an exported tree): all but outputs
        str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if not {"runs", "__pycache__", ".venv"} & set(p.parts)]
    for f in files:
        if (ROOT / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, work / f)


def scope_lines(path, names):
    """Line ranges of the named functions ('f', 'Class.method'; nested functions included) and module-level
    assignments ('NAME') of a module."""
    tree, ranges, found = ast.parse(Path(path).read_text()), [], set()

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if name in names:
                    ranges.append((child.lineno, child.end_lineno))
                    found.add(name)
                visit(child, name + ".")
            elif not prefix and isinstance(child, ast.Assign):
                targets = [t.id for t in child.targets if isinstance(t, ast.Name)]
                targets += [e.id for t in child.targets if isinstance(t, ast.Tuple) for e in t.elts]
                for t in targets:
                    if t in names:
                        ranges.append((child.lineno, child.end_lineno))
                        found.add(t)

    visit(tree, "")
    missing = set(names) - found
    if missing:
        sys.exit(f"mutation: {path} has no {', '.join(sorted(missing))} (update the scope in its .toml)")
    return ranges


def restrict(session, module, names, exclude):
    """Mark mutants outside the scope, or of an excluded operator, as skipped (cosmic-ray's SKIPPED outcome)."""
    ranges, skip = scope_lines(module, names), re.compile("|".join(f"(?:{e})" for e in exclude) or "$^")
    db = sqlite3.connect(session)
    rows = db.execute("SELECT job_id, operator_name, start_pos_row FROM mutation_specs").fetchall()
    out = [(job,) for job, op, row in rows if skip.match(op) or not any(a <= row <= b for a, b in ranges)]
    db.executemany("INSERT OR REPLACE INTO work_results (job_id, worker_outcome, output) VALUES (?, 'SKIPPED', "
                   "'out of scope')", out)
    db.commit()
    return len(rows) - len(out)


def sample(session, n):
    """Keep a random sample (seed 0) of n in-scope mutants; the others are marked skipped, 'not sampled' (results they
    may have are dropped, so the sample does not depend on which mutants ran first)."""
    db = sqlite3.connect(session)
    jobs = sorted(job for (job,) in db.execute("SELECT s.job_id FROM mutation_specs s LEFT JOIN work_results r ON "
                                               "s.job_id = r.job_id WHERE r.output IS NULL OR r.output != 'out of scope'"))
    keep = set(random.Random(0).sample(jobs, min(n, len(jobs))))
    db.executemany("INSERT OR REPLACE INTO work_results (job_id, worker_outcome, output) VALUES (?, 'SKIPPED', "
                   "'not sampled')", [(j,) for j in jobs if j not in keep])
    db.commit()


def code(line):
    """A line's code without its trailing comment (Python's tokenizer finds it): what equivalent.md's rows quote."""
    line = line.strip()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line + "\n").readline):
            if tok.type == tokenize.COMMENT:
                return line[:tok.start[1]].strip()
    except (tokenize.TokenError, SyntaxError):    # the line of a statement that goes on below: its comment came first
        pass
    return line


def equivalents():
    """{(file, operator, mutated line's code): mutants} of the survivors judged equivalent, from equivalent.md's table
    rows. A line cell `code` covers every surviving mutant of its operator on that line; `code` -> `part` only the
    mutants whose changed line contains part (a line with several numbers, only one of whose changes is equivalent)."""
    rows = {}
    for line in (HERE / "equivalent.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].endswith(".py"):
            original, _, part = cells[1].partition(" -> ")
            rows.setdefault((cells[0], cells[2], code(original.strip("`"))), []).append(part.strip("`") or None)
    return rows


def is_equivalent(known, module, op, line, diff):
    """Whether equivalent.md's rows cover this survivor (its operator, its line's code, what the mutant made of it)."""
    parts = known.get((module, op, code(line)), [])
    changed = [d[1:].strip() for d in (diff or "").splitlines() if d.startswith("+") and not d.startswith("+++")]
    return any(part is None or any(part in c for c in changed) for part in parts)


def report(work, name, module):
    db = sqlite3.connect(work / "session.sqlite")
    rows = db.execute("SELECT s.job_id, s.operator_name, s.start_pos_row, r.worker_outcome, r.test_outcome, r.diff, "
                      "r.output FROM mutation_specs s LEFT JOIN work_results r ON s.job_id = r.job_id").fetchall()
    lines = (work / module).read_text().splitlines()
    known, counts, survivors = equivalents(), dict(killed=0, survived=0, equivalent=0, pending=0, other=0), []
    in_scope = sum(output != "out of scope" for *_, output in rows)
    for job, op, row, worker, test, diff, output in rows:
        worker, test = (worker or "").lower() or None, (test or "").lower()
        if worker == "skipped":
            continue
        if worker is None:
            counts["pending"] += 1
        elif worker != "normal":
            counts["other"] += 1                    # abnormal: the mutant broke the import or the test run itself
        elif test == "killed":
            counts["killed"] += 1
        elif is_equivalent(known, module, op, lines[row - 1], diff):
            counts["equivalent"] += 1
        else:
            counts["survived"] += 1
            survivors.append(f"--- {module}:{row} {op}\n{lines[row - 1].strip()}\n{diff or ''}\n")
    (work / "survivors.txt").write_text("\n".join(survivors))
    done = counts["killed"] + counts["survived"]
    score = f"{100 * counts['killed'] / done:.1f}%" if done else "n/a"
    sampled = sum(counts.values())
    print(f"mutation {module}: {sampled} of {in_scope} in-scope mutants"
          + (" (a random sample)" if sampled < in_scope else "")
          + f"; score {score} = {counts['killed']} killed / {done} non-equivalent "
          f"({counts['equivalent']} equivalent, {counts['pending']} pending, {counts['other']} abnormal); "
          f"survivors: {work / 'survivors.txt'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="the config tests/mutation/<name>.toml (common, fid, pd, cd, cfd, sferd, sfddm, sfd)")
    p.add_argument("--work", help="scratch folder (default: a new temporary one); an existing one is resumed")
    p.add_argument("--report-only", metavar="WORK", help="only print the score of the session in WORK")
    p.add_argument("--sample", type=int, metavar="N", help="run only a random sample (seed 0) of N of the in-scope "
                   "mutants: an estimate of the score in a fraction of the time")
    p.add_argument("--rerun-survivors", action="store_true", help="with --work: copy the current tests into WORK and run "
                   "the survivors again (the module itself must be unchanged)")
    p.add_argument("--cosmic-ray", default="cosmic-ray", help="the cosmic-ray executable (default: on PATH)")
    args = p.parse_args()
    config = tomllib.loads((HERE / f"{args.name}.toml").read_text())["cosmic-ray"]
    module = config["module-path"]
    if args.report_only:
        return report(Path(args.report_only), args.name, module)
    work = Path(args.work or tempfile.mkdtemp(prefix=f"fewstep-mutation-{args.name}-"))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(work / "tests" / "mutation"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",   # `python`: this interpreter
               FEWSTEP_MUT_MODULE=str(work / module), FEWSTEP_MUT_PRISTINE=str(work / "pristine.py"))
    fresh = not (work / "session.sqlite").exists()
    if fresh or args.rerun_survivors:
        if args.rerun_survivors and not fresh and (ROOT / module).read_text() != (work / "pristine.py").read_text():
            sys.exit(f"mutation: {module} changed since {work} was set up: start a new session")
        work.mkdir(parents=True, exist_ok=True)
        copy_repo(work)
        shutil.copy2(work / module, work / "pristine.py")
        # The baseline: every fast test passes unmutated; which module lines each one executes (fast.py).
        r = subprocess.run(config["test-command"].split(), cwd=work, env=dict(env, FEWSTEP_MUT_TRACE=str(work / "lines.json")))
        if r.returncode:
            sys.exit(f"mutation: the fast tests fail on the unmutated code ({config['test-command']})")
    if args.rerun_survivors and not fresh:
        db = sqlite3.connect(work / "session.sqlite")
        n = db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'").rowcount
        db.commit()
        print(f"mutation {module}: running {n} survivors again with the current tests", flush=True)
    if fresh:
        subprocess.run([args.cosmic_ray, "init", str(HERE / f"{args.name}.toml"), "session.sqlite"], cwd=work, env=env,
                       check=True)
        scope = config["filters"]["fewstep-scope"]
        n = restrict(work / "session.sqlite", work / module, scope["names"], scope.get("exclude-operators", []))
        print(f"mutation {module}: {n} mutants in scope; working in {work}", flush=True)
    if args.sample:
        sample(work / "session.sqlite", args.sample)
    # Each mutant runs only the tests that execute its line (fast.py), fastest first, in a child of server.py.
    env = dict(env, FEWSTEP_MUT_MAP=str(work / "lines.json"))
    sock = work / "server.sock"
    serve = work / "tests" / "mutation" / "server.py"        # the scratch copy's: editing the checkout changes nothing here
    server = subprocess.Popen([sys.executable, str(serve), str(sock)], cwd=work, env=env)
    try:
        pytest_args = config["test-command"].split(" -m pytest ", 1)[1]
        (work / "exec.toml").write_text((HERE / f"{args.name}.toml").read_text().replace(
            config["test-command"], f"python {serve} --client {sock} -- {pytest_args}"))
        while not sock.exists():
            time.sleep(0.1)
        subprocess.run([args.cosmic_ray, "exec", "exec.toml", "session.sqlite"], cwd=work, env=env, check=True)
    finally:
        server.kill()
    report(work, args.name, module)


if __name__ == "__main__":
    main()
