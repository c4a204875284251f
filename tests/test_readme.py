"""The README's first two commands are exactly what CI runs."""
import re
import shlex

import pytest
from conftest import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", text)[:2]


def test_ci_runs_the_readme_commands():
    install, test = _readme_commands()
    ci = (REPO / ".ci" / "run").read_text()
    assert install in ci
    assert test in ci
    assert "models/" in install and "squeeze " in install
    assert "pytest" in test


def _sample_table() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"prints a table like this.*?\n```\n(.+?)\n```", text, re.S)
    assert block, "the README's sample output block is missing"
    return block.group(1).splitlines()


def _rows(lines: list[str]) -> dict[str, list[float]]:
    """Row label → the numbers in it (thousands separators dropped)."""
    rows = {}
    for line in lines[1:]:
        label = re.split(r"\s{2,}", line.strip())[0]
        rows[label] = [float(x.replace(",", "")) for x in re.findall(r"[-+]?\d[\d,]*\.?\d*", line[len(label) + 2:])]
    return rows


@pytest.mark.tvm
def test_readme_sample_output_matches_what_the_command_prints(tmp_path, capsys):
    """The README's sample table is what the README's command prints now: the same rows in the same order, sizes,
    parameters, MACs and accuracy within a few percent, latencies within 10× (they depend on the machine)."""
    from squeeze.cli import main
    install, _ = _readme_commands()
    command = install.split("&& squeeze ", 1)[1]
    argv = shlex.split(command)
    argv = [str(REPO / a) if a.startswith("models/") else a for a in argv]
    argv[argv.index("-o") + 1] = str(tmp_path / "digits.squeeze")
    assert main(argv) == 0
    # `note:` lines (a timing taken while other processes kept cores busy) depend on the machine's load
    printed = [line for line in capsys.readouterr().out.splitlines()
               if line.strip() and not line.startswith(("wrote", "note:"))]
    sample = _sample_table()
    assert re.split(r"\s{2,}", printed[0].strip()) == re.split(r"\s{2,}", sample[0].strip())
    got, want = _rows(printed), _rows(sample)
    assert list(got) == list(want), (list(got), list(want))
    for label, numbers in want.items():
        assert len(got[label]) == len(numbers), (label, got[label], numbers)
        timed = label.startswith(("ONNX Runtime", "cpu"))
        for g, w in zip(got[label][:2], numbers[:2]):
            if timed:
                assert w / 10 <= g <= w * 10, (label, g, w)
            else:
                assert abs(g - w) <= 0.05 * abs(w) + 0.5, (label, g, w)
