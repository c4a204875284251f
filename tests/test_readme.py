"""The README's first two commands are exactly what CI runs."""
import re

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
