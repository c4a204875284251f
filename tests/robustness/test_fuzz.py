"""The fuzz suite: generated and mutated models (see mutate.py) through the API and the CLI, each with a timeout.

Every case must end in a valid output (control-flow nodes left as they were and listed in the pass notes) or a
one-line SqueezeError; never another exception, never a hang. `SQUEEZE_FUZZ_N` sets the number of cases,
`SQUEEZE_FUZZ_SEED` the seed. The fast run (default) takes a few hundred cases; the slow step thousands.
Counts are printed in the "robustness" section of the test summary.
"""
from __future__ import annotations

import os
import time

import pytest

from robustness import fuzz, models

SEED = int(os.environ.get("SQUEEZE_FUZZ_SEED", "11"))


def _n(default: int) -> int:
    return int(os.environ.get("SQUEEZE_FUZZ_N", default))


def _run_suite(tmp_path, label: str, seed: int, n: int, out_dir_every: int, cli_every: int,
               corpus_share: float) -> list[fuzz.Outcome]:
    runner = fuzz.Runner(tmp_path, log=tmp_path / "worker.log")
    outcomes = []
    out_dirs = set()
    started = time.perf_counter()
    try:
        for job in fuzz.plan(n, out_dir_every, cli_every):
            if job["out_dir"]:
                out_dirs.add(job["index"])
            outcomes.append(runner.run(seed, job["index"], out_dir=job["out_dir"], cli=job["cli"],
                                       corpus_share=corpus_share))
    finally:
        runner.close()
    summary = fuzz.summarize(outcomes, time.perf_counter() - started, seed, corpus_share)
    fuzz.SUMMARIES.append(f"{label} (seed {seed}): {summary}")
    print(f"\n{label}: {summary}")
    assert len(outcomes) == n
    bad = [o for o in outcomes if o.outcome in ("unexpected", "hang")]
    report = "\n\n".join(
        f"case {o.index} ({o.via}) {o.outcome}: {o.case}\n  {o.detail[:1500]}\n  problems: {o.problems}\n"
        f"  reproduce: PYTHONPATH=tests python -m robustness.fuzz --seed {seed} --index {o.index} "
        f"--corpus-share {corpus_share}{' --out-dir' if o.index in out_dirs else ''}"
        f"{' --cli' if o.via == 'cli' else ''}" for o in bad[:15])
    assert not bad, f"{len(bad)} of {n} cases ended badly:\n{report}"
    return outcomes


def test_fuzz_fast(tmp_path):
    """A few hundred cases: every edge case in models.EDGE_CASES first, then mutated ones."""
    n = _n(240)
    assert n >= len(models.EDGE_CASES) or "SQUEEZE_FUZZ_N" in os.environ
    outcomes = _run_suite(tmp_path, "fuzz (fast)", SEED, n, out_dir_every=20, cli_every=80, corpus_share=0.05)
    if "SQUEEZE_FUZZ_N" not in os.environ:
        assert len(outcomes) >= 200
        kinds = {o.outcome for o in outcomes}
        assert {"ok", "error"} <= kinds  # the mix is real: some models compress, some are refused


@pytest.mark.slow
def test_fuzz_slow(tmp_path):
    """Thousands of cases, with more corpus models, output folders and CLI runs (another seed)."""
    n = max(_n(2000), 2000) if "SQUEEZE_FUZZ_N" not in os.environ else _n(2000)
    outcomes = _run_suite(tmp_path, "fuzz (slow)", SEED + 1000, n, out_dir_every=10, cli_every=50,
                          corpus_share=0.15)
    assert len(outcomes) == n


def test_a_hanging_case_is_caught_and_the_worker_replaced(tmp_path):
    runner = fuzz.Runner(tmp_path, timeout=2)
    try:
        hung = runner.run(SEED, 0, debug_sleep=60)
        assert hung.outcome == "hang" and "no answer within 2" in hung.detail
        after = runner.run(SEED, 1)  # a fresh worker takes the next case
        assert after.outcome in ("ok", "pass_failed", "error"), after
    finally:
        runner.close()


def test_the_mutator_is_deterministic():
    from robustness import mutate
    for index in (0, 5, len(models.EDGE_CASES) + 3, 500, 1999):
        a, b = mutate.case(SEED, index), mutate.case(SEED, index)
        assert (a.describe(), a.files, a.links) == (b.describe(), b.files, b.links)
