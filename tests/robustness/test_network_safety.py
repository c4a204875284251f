"""Network safety: squeeze listens on nothing by itself, and anything that listens binds to loopback by default.

The scan covers the package (squeeze/, passes/, targets/): every call that could open a listening socket (socket
bind/listen/create_server, http/socketserver servers, TVM RPC servers and trackers, `tvm.exec.rpc_*` launches)
must name a loopback address as a literal, or take the address from a parameter whose default is loopback.
targets/remote.py is a client (`--rpc`/`--tracker` name the device); it is checked like the rest.
"""
from __future__ import annotations

import ast
from pathlib import Path

import psutil
import pytest

import graphs
import squeeze

from conftest import REPO

PACKAGE = [REPO / "squeeze", REPO / "passes", REPO / "targets"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
LISTENERS = {"bind", "listen", "create_server", "HTTPServer", "ThreadingHTTPServer", "TCPServer", "Server",
             "Tracker", "serve", "start_server"}


def _sources() -> list[Path]:
    return sorted(p for folder in PACKAGE for p in folder.rglob("*.py"))


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _loopback_defaults(func: ast.FunctionDef | ast.AsyncFunctionDef | None) -> set[str]:
    """Parameters of the enclosing function whose default is a loopback address."""
    if func is None:
        return set()
    args = func.args.args + func.args.kwonlyargs
    defaults = [None] * (len(func.args.args) - len(func.args.defaults)) + func.args.defaults + func.args.kw_defaults
    return {a.arg for a, d in zip(args, defaults) if isinstance(d, ast.Constant) and d.value in LOOPBACK}


def _socket_call(call: ast.Call) -> bool:
    """`x.bind((host, port))`, `sock.bind(addr)`, `sock.listen(...)`: a method call on something socket-like."""
    if not isinstance(call.func, ast.Attribute):
        return False
    receiver = ast.unparse(call.func.value).lower()
    return "sock" in receiver or "server" in receiver or bool(call.args and isinstance(call.args[0], ast.Tuple))


def _listening_calls(paths: list[Path] | None = None):
    for path in paths or _sources():
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            launches = any(s.startswith("tvm.exec.rpc_") for s in _strings(node))
            if name in ("bind", "listen") and not _socket_call(node):
                continue  # spec.bind(...), registry binding: not sockets
            if name not in LISTENERS and not launches:
                continue
            func = node
            while func in parents and not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                func = parents[func]
            yield path, node, func if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def test_nothing_in_the_package_binds_to_every_interface():
    for path in _sources():
        strings = _strings(ast.parse(path.read_text(), str(path)))
        assert "0.0.0.0" not in strings and "::" not in strings, f"{path} names a wildcard address"


def _unsafe(paths: list[Path] | None = None) -> list[str]:
    found = []
    for path, call, func in _listening_calls(paths):
        names = {n.id for n in ast.walk(call) if isinstance(n, ast.Name)}
        if isinstance(call.func, ast.Attribute) and call.func.attr in ("listen", "serve") and not call.args:
            continue  # listen() on a socket bound above (the bind itself is checked)
        if not (LOOPBACK & set(_strings(call)) or names & _loopback_defaults(func)):
            found.append(f"{path.name}:{call.lineno}: {ast.unparse(call)[:120]}")
    return found


def test_the_scan_finds_listeners_that_are_not_on_loopback(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import socket, subprocess, sys\n"
                   "def serve(port, host='0.0.0.0'):\n"
                   "    s = socket.socket()\n"
                   "    s.bind((host, port))\n"
                   "def device():\n"
                   "    subprocess.Popen([sys.executable, '-m', 'tvm.exec.rpc_server', '--port', '9090'])\n"
                   "def fine(port, host='127.0.0.1'):\n"
                   "    socket.socket().bind((host, port))\n")
    assert [line.split(":")[1] for line in _unsafe([bad])] == ["4", "6"]


def test_every_listener_binds_to_loopback_unless_told_otherwise():
    assert _unsafe() == []


def test_remote_targets_are_clients(repo):
    remote = repo / "targets" / "remote.py"
    if not remote.exists():
        pytest.skip("targets/remote.py does not exist yet")
    text = remote.read_text()
    calls = [c for p, c, _ in _listening_calls() if p == remote]
    assert calls == [] or all(LOOPBACK & set(_strings(c)) for c in calls)
    assert "0.0.0.0" not in text


def test_a_run_opens_no_listening_socket(tmp_path):
    me = psutil.Process()
    before = {c.laddr for c in me.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    squeeze.compress(graphs.conv_bn_relu(), "cleanup,fold-bn", targets="", runs=1, out_dir=tmp_path / "out")
    after = {c.laddr for c in me.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert after <= before
