"""`python benchmarks/run.py --all`: runs each per-issue script whose table is not current, records how (code commit,
HEAD, date, load, command) in results/run-all.json, skips a table already produced at the code it runs now, runs
again a table whose code moved on, that was edited by hand, or whose script failed."""
from __future__ import annotations

import textwrap

import pytest

from benchmarks import run as bench

SCRIPT = textwrap.dedent("""
    import pathlib, sys
    here = pathlib.Path(__file__).resolve().parent
    (here / "calls.txt").open("a").write("x")
    if "--fail" in sys.argv:
        print("first line"); print("boom: the last line says why"); sys.exit(3)
    (here / "results").mkdir(exist_ok=True)
    (here / "results" / "fake.md").write_text("# fake table\\n")
""")


@pytest.fixture
def scripts(tmp_path, monkeypatch):
    (tmp_path / "fake.py").write_text(SCRIPT)
    monkeypatch.setattr(bench, "SCRIPTS_DIR", tmp_path)
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench, "STAMPS", tmp_path / "results" / "run-all.json")
    monkeypatch.setattr(bench, "ISSUE_SCRIPTS", [("fake", []), ("absent", [])])
    monkeypatch.setattr(bench, "script_code_key", lambda name: ("abc1234", []))
    return tmp_path


def _calls(folder) -> int:
    path = folder / "calls.txt"
    return len(path.read_text()) if path.is_file() else 0


def test_runs_then_skips_a_table_current_at_this_code(scripts):
    lines = bench.run_all(["fake", "absent"], dry_run=False)
    assert lines[0].startswith("fake: ok in ") and _calls(scripts) == 1
    assert lines[1] == "absent: no benchmarks/absent.py in this checkout; left out"
    stamp = bench.load_stamps()["fake"]
    assert stamp["code"] == "abc1234" and stamp["status"] == "ok" and stamp["exit"] == 0
    assert stamp["command"] == "python benchmarks/fake.py" and stamp["load_start"] and stamp["started"]
    state, line = bench.table_state("fake", bench.load_stamps())
    assert state == "current" and "`python benchmarks/fake.py` at code `abc1234`" in line
    again = bench.run_all(["fake"], dry_run=False)
    assert again[0].startswith("fake: skipped, already produced at the current code") and _calls(scripts) == 1


def test_reruns_when_the_code_moved_on_or_the_table_was_edited(scripts, monkeypatch):
    bench.run_all(["fake"], dry_run=False)
    monkeypatch.setattr(bench, "script_code_key", lambda name: ("def5678", []))
    state, line = bench.table_state("fake", bench.load_stamps())
    assert state == "stale" and "now at `def5678`" in line
    assert bench.run_all(["fake"], dry_run=True)[0].startswith("fake: would run (stale") and _calls(scripts) == 1
    bench.run_all(["fake"], dry_run=False)
    assert _calls(scripts) == 2 and bench.table_state("fake", bench.load_stamps())[0] == "current"
    (scripts / "results" / "fake.md").write_text("# edited by hand\n")
    assert bench.table_state("fake", bench.load_stamps())[0] == "stale"
    bench.run_all(["fake"], dry_run=False)
    assert _calls(scripts) == 3


def test_a_failed_script_is_recorded_with_its_last_line_and_run_again(scripts, monkeypatch):
    monkeypatch.setattr(bench, "ISSUE_SCRIPTS", [("fake", ["--fail"])])
    (line,) = bench.run_all(["fake"], dry_run=False)
    assert line.startswith("fake: failed") and "boom: the last line says why" in line
    state, text = bench.table_state("fake", bench.load_stamps())
    assert state == "failed" and "exit 3" in text
    bench.run_all(["fake"], dry_run=False)
    assert _calls(scripts) == 2  # a failure is never taken for a finished table


def test_a_table_without_a_stamp_is_marked_as_made_by_hand(scripts):
    (scripts / "results").mkdir()
    (scripts / "results" / "fake.md").write_text("# made by its own command\n")
    state, line = bench.table_state("fake", {})
    assert state == "by hand" and line.startswith("code commit not recorded")


def test_imports_of_a_script_key_its_code():
    assert bench._benchmark_imports("real_models")[:1] == ["real_models"]
    assert {"run", "corpus"} <= set(bench._benchmark_imports("real_models"))
    assert "run" not in bench._benchmark_imports("prune_curve")


def test_render_writes_the_cached_main_table_at_its_code_and_the_issue_tables(scripts, monkeypatch):
    """`--render` runs nothing: the main table comes from the cache at the code its last invocation measured (the
    file says which), the per-issue tables from results/; an empty cache is refused with exit 2."""
    monkeypatch.setattr(bench.corpus, "available", lambda: True)
    (scripts / "results").mkdir()
    (scripts / "results" / "fake.md").write_text("# fake table\n\n| a |\n|---|\n| 1 |\n")
    cache = bench.Cache(scripts / "cache.json", False)
    cfg = {"seed": 0, "threads": 1, "runs": 50, "code": "0ld0c0d", "head": "0ld0c0d", "eval": {"mnist_burn": None}}
    cache.data["invocations"].append({"command": "python benchmarks/run.py", "code": "0ld0c0d", "head": "0ld0c0d",
                                      "started": "2026-01-01 00:00:00 UTC", "seconds": 60.0})
    cache.data["cells"][bench._cell_key("mnist_burn", "quant", cfg)] = {
        "status": "done", "invocation": 0, "row": {"top-1": 98.5, "note": "measured"}}
    cache.save()
    out = scripts / "B.md"
    args = ["--render", "--cache", str(scripts / "cache.json"), "--out", str(out), "--models", "mnist_burn",
            "--pipelines", "quant"]
    assert bench.main(args) == 0
    text = out.read_text()
    assert "at commit `0ld0c0d`" in text and "| mnist_burn | `quant` |" in text and "98.50" in text
    assert "INCOMPLETE" not in text and "## fake table" in text
    assert bench.main(["--render", "--cache", str(scripts / "empty.json"), "--out", str(out)]) == 2


def test_a_table_made_by_another_script_with_arguments_and_the_records_kept_by_hand(scripts, monkeypatch):
    """A (table, script, arguments) entry runs that script with them, is stamped under the table's name and keyed
    by the script's code; records (results/records/*.md and results/*.md no entry writes) follow the tables,
    listed apart and not counted as regenerated tables."""
    (scripts / "maker.py").write_text(textwrap.dedent("""
        import pathlib, sys
        out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
        out.parent.mkdir(exist_ok=True)
        out.write_text("# other table " + sys.argv[1] + "\\n")
    """))
    keyed = []
    monkeypatch.setattr(bench, "script_code_key", lambda name: keyed.append(name) or ("abc1234", []))
    monkeypatch.setattr(bench, "RECORDS", scripts / "results" / "records")
    monkeypatch.setattr(bench, "ISSUE_SCRIPTS", [
        ("fake", []), ("other", "maker", ["two words", "--out", str(scripts / "results" / "other.md")])])
    (line,) = bench.run_all(["other"], dry_run=False)
    assert line.startswith("other: ok in ") and "maker" in keyed
    assert (scripts / "results" / "other.md").read_text() == "# other table two words\n"
    stamp = bench.load_stamps()["other"]
    assert stamp["command"].startswith("python benchmarks/maker.py 'two words' --out ")
    assert bench.table_state("other", bench.load_stamps())[0] == "current"
    (scripts / "results" / "records").mkdir()
    (scripts / "results" / "records" / "notes.md").write_text("# notes by hand\n")
    (scripts / "results" / "stray.md").write_text("# a stray table\n")
    text = "\n".join(bench._issue_tables(scripts / "B.md"))
    assert "1 of 2 tables were produced that way" in text
    assert "- [other.md](results/other.md) — `python benchmarks/maker.py 'two words'" in text
    assert "not produced yet: `python benchmarks/fake.py`" in text
    records = text.split("Records kept by hand (2;")[1]
    assert "[notes.md](results/records/notes.md)" in records and "[stray.md](results/stray.md)" in records
    assert text.index("## other table two words") < text.index("## a stray table") < text.index("## notes by hand")


def test_jobs_runs_scripts_side_by_side_but_an_all_cores_one_alone(scripts, monkeypatch):
    """`--jobs 2`: scripts that time on one core share the machine two at a time, all in one pool; one in ALL_CORES
    (its 2-thread rows need both cores) runs after them, alone; the lines come back in ISSUE_SCRIPTS order."""
    body = textwrap.dedent("""
        import pathlib, sys, time
        here = pathlib.Path(__file__).resolve().parent
        name = pathlib.Path(__file__).stem
        start = time.time(); time.sleep(0.6)
        (here / "spans.txt").open("a").write(f"{name} {start} {time.time()}\\n")
        (here / "results").mkdir(exist_ok=True)
        (here / "results" / (name + ".md")).write_text("# " + name + "\\n")
    """)
    for name in ("one", "two", "three", "solo"):
        (scripts / f"{name}.py").write_text(body)
    monkeypatch.setattr(bench, "ISSUE_SCRIPTS", [("one", []), ("solo", []), ("two", []), ("three", [])])
    monkeypatch.setattr(bench, "ALL_CORES", {"solo"})
    lines = bench.run_all(["one", "two", "three", "solo"], dry_run=False, jobs=2)
    assert [line.split(":")[0] for line in lines] == ["one", "solo", "two", "three"]
    assert all(": ok in " in line for line in lines)
    spans = {n: (float(a), float(b)) for n, a, b in (row.split() for row in
                                                     (scripts / "spans.txt").read_text().splitlines())}

    def overlap(a: str, b: str) -> bool:
        return spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
    assert overlap("two", "three") or overlap("one", "two")
    assert not any(overlap("solo", other) for other in ("one", "two", "three"))
    assert spans["solo"][0] >= max(spans[n][1] for n in ("one", "two", "three"))  # the pool first, then solo
    assert {n for n, s in bench.load_stamps().items() if s["status"] == "ok"} == {"one", "two", "three", "solo"}
