"""The import graph of smtpgw/: no cycle, nothing below app/ imports it, and the folders keep
the dependency order ARCHITECTURE.md gives ("Dependency order").

Every ``import smtpgw...`` and ``from smtpgw... import`` of every module counts, wherever it is
written: at the top, inside a function (a lazy import), or under ``if TYPE_CHECKING:`` (a cycle
that only a type checker follows is still two modules that each need the other).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import smtpgw

ROOT = Path(smtpgw.__file__).parent

# The folders (and top-level modules) in dependency order: a module may import from its own
# folder and from folders of a lower rank; folders of the same rank may import each other, except
# the pipeline stages (rank 4), which never import one another: the gateway hands a message from
# one to the next. ARCHITECTURE.md, "Dependency order", explains each rank.
RANKS: dict[str, int] = {
    "smtpgw": 0, "log": 0, "net": 0, "spool": 0,
    "rules": 1, "stats": 1,
    "mail": 2, "config": 2,
    "reports": 3, "spam": 3,
    "receive": 4, "scan": 4, "deliver": 4,
    "update": 5, "console": 5,
    "app": 6,
}
STAGES = {"receive", "scan", "deliver"}
# config checks two values with their owners' own parsers: AdminPasswordHash (console/auth.py)
# and PublicKey (update/signing.py). Both reach nothing but their own folder and rank 0 (asserted below).
EXCEPTIONS = {("smtpgw.config", "smtpgw.console.auth"), ("smtpgw.config", "smtpgw.update.signing"),
              ("smtpgw.mail.dkim", "smtpgw.update.ed25519")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The smtpgw modules ``path`` imports: ``from P import name`` counts as P.name when that is
    a module, else as P."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "smtpgw" or a.name.startswith("smtpgw."))
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the package imports absolutely)"
            base = node.module or ""
            if base == "smtpgw" or base.startswith("smtpgw."):
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


GRAPH: dict[str, set[str]] = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def folder(name: str) -> str:
    """``smtpgw.receive.receiver`` → receive; ``smtpgw.config`` → config; ``smtpgw`` → smtpgw."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_names_a_module_of_the_package() -> None:
    unknown = {(name, target) for name, targets in GRAPH.items() for target in targets if target not in MODULES}
    assert not unknown


def test_every_folder_has_a_rank() -> None:
    assert {folder(name) for name in MODULES} == set(RANKS)


def test_no_import_cycle() -> None:
    assert cycles(GRAPH) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_nothing_outside_app_imports_app() -> None:
    assert {(name, target) for name, targets in GRAPH.items() for target in targets
            if folder(target) == "app" and folder(name) != "app"} == set()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_keep_the_dependency_order(name: str) -> None:
    mine = folder(name)
    wrong = []
    for target in sorted(GRAPH[name]):
        theirs = folder(target)
        if theirs == mine or (name, target) in EXCEPTIONS:
            continue
        if RANKS[theirs] > RANKS[mine] or (RANKS[theirs] == RANKS[mine] and mine in STAGES):
            wrong.append(target)
    assert wrong == [], f"{name} imports {wrong} (rank {RANKS[mine]})"


def reached(name: str) -> set[str]:
    """Every module ``name`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        for target in GRAPH[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


@pytest.mark.parametrize("name", sorted({target for _, target in EXCEPTIONS}))
def test_the_exceptions_are_leaves(name: str) -> None:
    """What config imports from above reaches only its own folder and rank 0."""
    assert {t for t in reached(name) if folder(t) != folder(name) and RANKS[folder(t)] != 0} == set()


def test_the_stages_hold_no_gateway() -> None:
    """Each stage declares what it needs: no stage module names the Gateway class."""
    for name, path in MODULES.items():
        if folder(name) in STAGES | {"spool", "reports", "console"}:
            assert "Gateway" not in {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}, name


def protocol_members(protocol: type) -> set[str]:
    """The attributes and methods a Protocol declares (its own and its bases' up to Protocol)."""
    members: set[str] = set()
    for cls in protocol.__mro__:
        if cls.__module__ in ("typing", "builtins", "typing_extensions"):
            continue
        members.update(getattr(cls, "__annotations__", {}))
        members.update(name for name, value in vars(cls).items() if callable(value) and not name.startswith("_"))
    return members


def gateway_members() -> set[str]:
    """What a Gateway has: its methods and properties, and every ``self.NAME = ...`` it assigns."""
    tree = ast.parse(MODULES["smtpgw.app.gateway"].read_text())
    [gateway] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Gateway"]
    found = {n.name for n in gateway.body if isinstance(n, ast.FunctionDef)}
    for node in ast.walk(gateway):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        found.update(t.attr for t in targets if isinstance(t, ast.Attribute)
                     and isinstance(t.value, ast.Name) and t.value.id == "self")
    return found


def test_the_gateway_provides_every_interface_it_is_given_as() -> None:
    from smtpgw.app.control import Operations
    from smtpgw.app.memory import Reported
    from smtpgw.console.request import Gatekeeper
    from smtpgw.deliver.sender import Outbound
    from smtpgw.receive.receiver import Inbound
    from smtpgw.reports.digest import Digesting
    from smtpgw.scan.scanner import Scanning

    assert {"cfg", "resolver", "loop", "committer", "message_received", "session_closed"} <= protocol_members(Inbound)
    has = gateway_members()
    assert "queue_depth" not in has and {"cfg", "sender", "message_scanned"} <= has
    missing = {p.__name__: sorted(protocol_members(p) - has)
               for p in (Inbound, Scanning, Outbound, Operations, Digesting, Gatekeeper, Reported)}
    assert missing == {name: [] for name in missing}
