"""The layout rules of docs/architecture.md, checked on the source (AST), so that they stay true.

- The core (`squeeze/`) reaches passes and targets only through the registry (`registry._load_plugins` imports
  the two packages; everything else asks `registry.get_pass/get_target/hook`).
- Passes never import targets; only targets import TVM.
- No module imports another module's private (`_name`) helpers.
- Every source file has fewer than 1000 lines, every function at most 100; docs/architecture.md names every module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"squeeze": "squeeze", "passes": "squeeze.passes", "targets": "squeeze.targets"}
ALLOWED_PLUGIN_LOADER = ("squeeze/registry.py", "_load_plugins")
#: Files allowed to break a rule for now (empty since issue 20's restructuring): an entry that no longer breaks
#: its rule fails the test until it is removed, so the lists only shrink.
NOT_YET_IMPORTS: set[str] = set()
NOT_YET_SMALL: set[str] = set()


def _modules() -> list[tuple[Path, str]]:
    found = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found.append((path, ".".join([package, *parts])))
    return found


def _imports(path: Path, module: str):
    """(imported module, imported names, enclosing function name, line) for every import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    out = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                out.extend((a.name, [], function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[:len(anchor) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [a.name for a in child.names]
                out.append((base, names, function, child.lineno))
                # `from package import module` imports a module
                out.extend((f"{base}.{n}", [], function, child.lineno) for n in names)
            visit(child, name)
    visit(tree, None)
    return out


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _is(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _check(bad: list[str], not_yet: set[str]) -> None:
    """No violation outside `not_yet`, and every file in it still has one (else it belongs off the list)."""
    files = {line.split(":")[0] for line in bad}
    assert not [line for line in bad if line.split(":")[0] not in not_yet], "\n".join(bad)
    assert not_yet <= files, f"{sorted(not_yet - files)} now keep the rule: take them off the NOT_YET list"


def test_the_core_reaches_passes_and_targets_only_through_the_registry():
    bad = []
    for path, module in _modules():
        if not _is(module, "squeeze") or _is(module, "squeeze.passes") or _is(module, "squeeze.targets"):
            continue
        for imported, _, function, line in _imports(path, module):
            if (_rel(path), function) == ALLOWED_PLUGIN_LOADER:
                continue
            if _is(imported, "squeeze.passes") or _is(imported, "squeeze.targets") or _is(imported, "tvm"):
                bad.append(f"{_rel(path)}:{line} imports {imported}")
    _check(bad, NOT_YET_IMPORTS)


def test_passes_never_import_targets_and_only_targets_import_tvm():
    bad = []
    for path, module in _modules():
        for imported, _, _, line in _imports(path, module):
            if _is(module, "squeeze.passes") and _is(imported, "squeeze.targets"):
                bad.append(f"{_rel(path)}:{line} imports {imported}")
            if not _is(module, "squeeze.targets") and (_is(imported, "tvm") or _is(imported, "tvm_ffi")):
                bad.append(f"{_rel(path)}:{line} imports {imported}")
    assert not bad, "\n".join(bad)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_private_names():
    """Neither `from m import _helper` nor `m._helper` for another module `m` of squeeze."""
    ours = {module for _, module in _modules()}
    bad = []
    for path, module in _modules():
        aliases = {}
        imports = _imports(path, module)
        for imported, names, _, line in imports:
            if imported in ours and imported != module:
                bad += [f"{_rel(path)}:{line} imports {imported}.{n}" for n in names if _private(n)]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):  # names bound to our modules: `from . import x`, `import a.b as x`
            if isinstance(node, ast.ImportFrom):
                base = [m for m, names, _, line in imports if line == node.lineno and names]
                for a in node.names:
                    full = f"{base[0]}.{a.name}" if base else a.name
                    if full in ours and full != module:
                        aliases[a.asname or a.name] = full
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in ours and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in aliases and _private(node.attr):
                bad.append(f"{_rel(path)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("limit_lines,limit_function", [(1000, 100)])
def test_files_and_functions_stay_small(limit_lines, limit_function):
    bad = []
    for path, _ in _modules():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") >= limit_lines:
            bad.append(f"{_rel(path)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit_function:
                    bad.append(f"{_rel(path)}:{node.lineno} {node.name}() has {length} lines")
    _check(bad, NOT_YET_SMALL)


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for path, _ in _modules():
        inside = path.relative_to(ROOT / _rel(path).split("/")[0]).as_posix()  # e.g. schedules/conv2d.py
        if path.name != "__init__.py" and not any(f"`{name}`" in page for name in (path.name, inside, _rel(path))):
            missing.append(_rel(path))
    assert not missing, "docs/architecture.md does not list: " + ", ".join(missing)
