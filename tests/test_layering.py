"""Import layering of the `studio` package, read from the source (AST), so nothing is imported to check it.

The rules (docs: DESIGN.md, "Import direction"):
- the GUI side (ui, client, protocol, library, families, units, media, settings, paths, chatstore,
  errors) imports neither torch nor studio.engine / studio.models / studio.nn, not even inside a
  function: the window's process never loads torch;
- studio.models never imports studio.engine; studio.nn imports neither studio.models nor studio.engine;
- studio.cli imports torch and the engine side only inside functions (`studio --help` stays light);
- no import cycles among studio modules, counting the imports that run when a module is imported (an
  import inside a function may break a cycle; one under `if TYPE_CHECKING:` never runs);
- no `except ImportError` / `ModuleNotFoundError` (or broader) handler around an import of a studio
  module: a broken module of ours must fail loudly, not turn into a missing feature.
Every failure names the file, the line and the rule.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "studio"

GUI_SIDE = ("studio.ui", "studio.client", "studio.protocol", "studio.library", "studio.families", "studio.units",
            "studio.media", "studio.settings", "studio.paths", "studio.chatstore", "studio.errors")
TORCH = ("torch", "torchvision", "torchaudio", "triton", "safetensors.torch")  # each one loads torch
ENGINE_SIDE = ("studio.engine", "studio.models", "studio.nn")
# handlers that would swallow a failed import; Exception and bare `except:` hide one just as well
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "studio.cli.doctor"
    path: str  # as shown in messages: "studio/ui/app.py"
    line: int
    target: str  # the module imported, resolved to a studio module where the name is one
    runs_at_import: bool  # at module level (or in a class body), not in a function, not under TYPE_CHECKING
    guarded: bool  # inside the body of a try whose handler catches ImportError (or broader)

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _catches_import_errors(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(k, ast.Name) and k.id in IMPORT_ERRORS
               or isinstance(k, ast.Attribute) and k.attr in IMPORT_ERRORS for k in kinds)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    def __init__(self, source: str, path: str, is_package: bool, modules: set[str]) -> None:
        self.source, self.path, self.is_package, self.modules = source, path, is_package, modules
        self.depth = 0  # functions we are inside
        self.type_checking = 0
        self.guards = 0  # try bodies with an ImportError handler we are inside
        self.found: list[Import] = []

    def _add(self, node: ast.AST, target: str) -> None:
        self.found.append(Import(self.source, self.path, node.lineno, target,
                                 self.depth == 0 and self.type_checking == 0, self.guards > 0))

    def _function(self, node: ast.AST) -> None:
        # decorators and defaults run at import; the body does not
        for expr in [*getattr(node, "decorator_list", []), *node.args.defaults, *node.args.kw_defaults]:
            if expr is not None:
                self.visit(expr)
        self.depth += 1
        for stmt in node.body if isinstance(node.body, list) else [node.body]:
            self.visit(stmt)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_checking += 1
            for stmt in node.body:
                self.visit(stmt)
            self.type_checking -= 1
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_errors(h) for h in node.handlers)
        self.guards += guarded
        for stmt in node.body:
            self.visit(stmt)
        self.guards -= guarded
        for part in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(part)

    visit_TryStar = visit_Try

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            package = self.source.split(".") if self.is_package else self.source.split(".")[:-1]
            if node.level - 1 > len(package) - 1:
                raise AssertionError(f"{self.path}:{node.lineno}: relative import climbs above the studio package")
            base = ".".join(package[: len(package) - (node.level - 1)])
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        for alias in node.names:
            sub = f"{module}.{alias.name}"
            self._add(node, sub if sub in self.modules else module)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("studio.x") / __import__("torch") with a constant name
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
            self._add(node, node.args[0].value)
        self.generic_visit(node)


def scan(root: Path = PACKAGE) -> tuple[set[str], list[Import]]:
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(p, root) for p in files}
    imports: list[Import] = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        shown = path.relative_to(root.parent).as_posix()
        collector = _Collector(module_name(path, root), shown, path.name == "__init__.py", modules)
        collector.visit(tree)
        imports += collector.found
    return modules, imports


@pytest.fixture(scope="module")
def studio_imports() -> tuple[set[str], list[Import]]:
    return scan()


def _report(rule: str, bad: list[Import]) -> str:
    lines = dict.fromkeys(f"{i.where()}: {i.source} imports {i.target}"
                          + ("" if i.runs_at_import else " (inside a function)") for i in bad)
    return f"{rule}:\n  " + "\n  ".join(lines)


def _violations(imports: list[Import], sources, targets, only_at_import: bool = False) -> list[Import]:
    return [i for i in imports if within(i.source, sources) and within(i.target, targets)
            and (i.runs_at_import or not only_at_import)]


def test_gui_side_imports_neither_torch_nor_the_engine_models_or_nn(studio_imports):
    _, imports = studio_imports
    bad = _violations(imports, GUI_SIDE, (*TORCH, *ENGINE_SIDE))
    assert not bad, _report("the GUI side (ui, client, protocol, library, families, units, media, settings, paths, "
                            "chatstore, errors) must not import torch, studio.engine, studio.models or studio.nn", bad)


def test_models_do_not_import_the_engine(studio_imports):
    _, imports = studio_imports
    bad = _violations(imports, "studio.models", "studio.engine")
    assert not bad, _report("studio.models must not import studio.engine (models -> nn, never -> engine)", bad)


def test_nn_imports_neither_models_nor_the_engine(studio_imports):
    _, imports = studio_imports
    bad = _violations(imports, "studio.nn", ("studio.models", "studio.engine"))
    assert not bad, _report("studio.nn must not import studio.models or studio.engine", bad)


def test_cli_loads_torch_and_the_engine_only_inside_functions(studio_imports):
    _, imports = studio_imports
    bad = _violations(imports, "studio.cli", (*TORCH, *ENGINE_SIDE), only_at_import=True)
    assert not bad, _report("studio.cli may import torch, studio.engine, studio.models or studio.nn only inside "
                            "the function that needs them", bad)


def find_cycles(modules: set[str], imports: list[Import]) -> list[list[Import]]:
    """One cycle (as the imports that form it) per strongly connected group of modules."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for i in imports:
        # Only the module named: importing studio.a.b also runs studio/a/__init__.py first, but that
        # package is then fully initialised before b runs, so it cannot close a cycle on its own.
        if i.runs_at_import and i.target in modules and i.target != i.source:
            edges[i.source].setdefault(i.target, i)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph has a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for m in sorted(modules):
        if m not in index:
            connect(m)
    cycles = []
    for group in groups:
        members = set(group)
        start = min(group)
        # breadth-first from start back to start inside the group: the shortest cycle through it
        paths: dict[str, list[Import]] = {start: []}
        queue = [start]
        cycle: list[Import] = []
        while queue and not cycle:
            v = queue.pop(0)
            for w, imp in sorted(edges[v].items()):
                if w == start:
                    cycle = paths[v] + [imp]
                    break
                if w in members and w not in paths:
                    paths[w] = paths[v] + [imp]
                    queue.append(w)
        cycles.append(cycle)
    return cycles


def test_no_import_cycles_among_studio_modules(studio_imports):
    modules, imports = studio_imports
    cycles = find_cycles(modules, imports)
    text = "\n".join(" -> ".join([c[0].source, *(i.target for i in c)]) + "\n    "
                     + "\n    ".join(f"{i.where()}: {i.source} imports {i.target}" for i in c) for c in cycles)
    assert not cycles, ("import cycles among studio modules (module-level imports; move one import into the "
                        f"function that needs it, or move the shared code down a layer):\n{text}")


def test_no_import_error_handler_hides_a_studio_import(studio_imports):
    _, imports = studio_imports
    bad = [i for i in imports if i.guarded and within(i.target, "studio")]
    assert not bad, _report("a try whose handler catches ImportError (or broader) must not import a studio "
                            "module: import it outside the try, and catch only the optional third-party "
                            "package by name (ModuleNotFoundError with exc.name)", bad)


# -- the checker itself, on a small package written for the purpose --------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "studio"


def test_checker_resolves_relative_and_function_imports_and_guards(tmp_path):
    pkg = _write(tmp_path, {
        "studio/__init__.py": "",
        "studio/ui/__init__.py": "from . import panel\n",
        "studio/ui/panel.py": ("from typing import TYPE_CHECKING\nfrom ..engine import device\n"
                               "if TYPE_CHECKING:\n    from studio.models import unet\n"
                               "def f():\n    import torch\n    from .. import units\n"
                               "try:\n    from studio.library import x\nexcept ImportError:\n    pass\n"),
        "studio/engine/__init__.py": "",
        "studio/engine/device.py": "import importlib\nm = importlib.import_module('studio.ui.panel')\n",
        "studio/models/__init__.py": "", "studio/models/unet.py": "", "studio/units.py": "",
    })
    modules, imports = scan(pkg)
    assert {"studio", "studio.ui", "studio.ui.panel", "studio.engine.device", "studio.units"} <= modules
    got = {(i.source, i.target, i.line, i.runs_at_import, i.guarded) for i in imports}
    assert ("studio.ui", "studio.ui.panel", 1, True, False) in got
    assert ("studio.ui.panel", "studio.engine.device", 2, True, False) in got
    assert ("studio.ui.panel", "studio.models.unet", 4, False, False) in got  # TYPE_CHECKING: never runs
    assert ("studio.ui.panel", "torch", 6, False, False) in got
    assert ("studio.ui.panel", "studio.units", 7, False, False) in got
    assert ("studio.ui.panel", "studio.library", 9, True, True) in got
    assert ("studio.engine.device", "studio.ui.panel", 2, True, False) in got
    bad = _violations(imports, GUI_SIDE, (*TORCH, *ENGINE_SIDE))
    assert {(i.target, i.line) for i in bad} == {("studio.engine.device", 2), ("studio.models.unet", 4), ("torch", 6)}
    assert "studio/ui/panel.py:6: studio.ui.panel imports torch (inside a function)" in _report("r", bad)
    (cycle,) = find_cycles(modules, imports)
    assert [(i.source, i.target) for i in cycle] == [("studio.engine.device", "studio.ui.panel"),
                                                     ("studio.ui.panel", "studio.engine.device")]


def test_checker_sees_the_real_tree(studio_imports):
    modules, imports = studio_imports
    assert {"studio.cli", "studio.units", "studio.media.video", "studio.engine.server", "studio.ui.app"} <= modules
    assert any(i.source == "studio.engine.device" and i.target == "studio.units" and i.runs_at_import
               for i in imports)
