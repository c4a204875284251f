"""Every Python package folder in the repo is installed by `pip install .` (a non-editable install)."""
import tomllib

from conftest import REPO


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = config["package-dir"]
    for top, name in (("squeeze", "squeeze"), ("passes", "squeeze.passes"), ("targets", "squeeze.targets")):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top)
            package = ".".join([name, *rel.parts]) if rel.parts else name
            assert package in listed, f"{package} ({init.parent}) is not in pyproject's packages"
            assert dirs.get(package, "").rstrip("/") == str(init.parent.relative_to(REPO)), package
