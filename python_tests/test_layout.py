"""docs/architecture.md against the tree: every file it maps exists in it and every file is
mapped, the package's imports run only down its floors, and each op keeps one name in all its
places.

Everything is read as text or parsed with ``ast``: no comet_ext module is imported here, so
import side effects (loading _C, transformers) play no part.

Lazy imports (inside a function) count like module-level ones: a module may import only
modules of lower floors. The one exception the code has today is listed in the map as an
``upward:`` line (``modeling -> convert``, in ``CometForCausalLM.from_pretrained``); a listed
exception must be a lazy import and must still exist.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP = os.path.join(ROOT, "docs", "architecture.md")
PKG = "comet_ext"
# Folders whose every file the map must name (bench/results/ is mapped as one folder).
MAPPED_DIRS = ("comet_ext", "csrc", "python_tests", "bench", "examples", "tools", ".ci", "docs")
UNMAPPED_DIRS = ("bench/results/",)
# Written by the build, so absent from a fresh clone: floors may name them anyway.
BUILT_MODULES = {"_C", "_build_info"}
# Only lazily: `import comet_ext` must not pull these in.
HEAVY = {"transformers", "peft", "matplotlib"}


def _map_text() -> str:
    with open(MAP, encoding="utf-8") as f:
        return f.read()


def _floors() -> tuple[dict[str, int], set[tuple[str, str]]]:
    """The floors (module -> floor) and the allowed upward edges, from the map."""
    floors, upward = {}, set()
    for line in _map_text().splitlines():
        m = re.fullmatch(r"floor (\d+):((?:\s+\S+)+)\s*", line)
        if m:
            for name in m.group(2).split():
                assert name not in floors, f"docs/architecture.md puts {name} on two floors"
                floors[name] = int(m.group(1))
        m = re.fullmatch(r"upward:\s+(\S+)\s+->\s+(\S+)\s*", line)
        if m:
            upward.add((m.group(1), m.group(2)))
    assert floors, "docs/architecture.md has no 'floor N: ...' lines"
    return floors, upward


def _modules() -> dict[str, str]:
    """Package module name (dotted, relative to comet_ext; '__init__' for the package) -> path."""
    out = {}
    for folder, dirs, files in os.walk(os.path.join(ROOT, PKG)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.join(ROOT, PKG))[:-3]
                name = rel.replace(os.sep, ".")
                out["__init__" if name == "__init__" else name.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


class _Edge:
    def __init__(self, target: str, line: int, lazy: bool):
        self.target, self.line, self.lazy = target, line, lazy


def _imports(name: str, path: str, known: set[str]) -> list[_Edge]:
    """Intra-package imports of one module: absolute (comet_ext.x), relative (.x), and
    importlib.import_module("comet_ext.x"); lazy when inside a function. A target that is
    no submodule (``from comet_ext import register``) is the package itself: '__init__'."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = name.rsplit(".", 1)[0] if "." in name else ""  # comet_ext-relative package of this module
    if name == "__init__":
        package = ""
    edges: list[_Edge] = []

    def resolve(dotted: str) -> str:
        """comet_ext-relative dotted name -> the module it names (or '__init__')."""
        parts = dotted.split(".") if dotted else []
        while parts and ".".join(parts) not in known:
            parts.pop()
        return ".".join(parts) if parts else "__init__"

    def add(dotted_from_pkg: str, names: list[str], line: int, lazy: bool) -> None:
        for n in names or [None]:
            full = ".".join(p for p in (dotted_from_pkg, n) if p)
            target = full if full in known else resolve(dotted_from_pkg)
            edges.append(_Edge(target, line, lazy))

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == PKG or alias.name.startswith(PKG + "."):
                        edges.append(_Edge(resolve(alias.name[len(PKG) + 1:]), child.lineno, inner))
            elif isinstance(child, ast.ImportFrom):
                names = [a.name for a in child.names]
                if child.level:
                    base = package.split(".") if package else []
                    up = child.level - 1
                    assert up <= len(base), f"{path}:{child.lineno}: relative import above comet_ext"
                    base = base[: len(base) - up]
                    dotted = ".".join(base + ([child.module] if child.module else []))
                    add(dotted, names, child.lineno, inner)
                elif child.module == PKG or (child.module or "").startswith(PKG + "."):
                    add(child.module[len(PKG) + 1:], names, child.lineno, inner)
            elif (isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)
                  and (child.args[0].value == PKG or child.args[0].value.startswith(PKG + "."))
                  and ((isinstance(child.func, ast.Attribute) and child.func.attr == "import_module")
                       or (isinstance(child.func, ast.Name) and child.func.id in ("import_module", "__import__")))):
                edges.append(_Edge(resolve(child.args[0].value[len(PKG) + 1:]), child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    return edges


def _graph() -> dict[str, list[_Edge]]:
    mods = _modules()
    known = set(mods) | BUILT_MODULES
    graph = {}
    for name, path in mods.items():
        edges = {(e.target, e.line): e for e in _imports(name, path, known)}  # one per (module, line)
        graph[name] = list(edges.values())
    return graph


def _rel(name: str) -> str:
    return f"comet_ext/{name.replace('.', '/')}.py"


# ---------------------------------------------------------------- import floors


def test_every_module_has_a_floor_and_every_floor_name_is_a_module():
    floors, _ = _floors()
    mods = set(_modules()) - {"__init__"}
    missing = sorted(mods - set(floors))
    assert not missing, f"modules with no floor in docs/architecture.md: {missing}"
    stale = sorted(set(floors) - mods - BUILT_MODULES)
    assert not stale, f"docs/architecture.md gives a floor to modules that do not exist: {stale}"


def test_imports_run_down_the_floors():
    floors, upward = _floors()
    bad = []
    for name, edges in _graph().items():
        if name == "__init__":  # the package's face re-exports from any floor
            continue
        for e in edges:
            if e.target == "__init__":
                bad.append(f"{_rel(name)}:{e.line} imports the package itself (import the submodule)")
            elif e.target in floors and floors[e.target] >= floors[name]:
                if (name, e.target) in upward and e.lazy:
                    continue
                bad.append(f"{_rel(name)}:{e.line} ({'lazy' if e.lazy else 'module level'}) imports "
                           f"{e.target} (floor {floors[e.target]}) from floor {floors[name]}")
    assert not bad, "imports against docs/architecture.md's floors:\n" + "\n".join(bad)


def test_each_module_sits_on_the_lowest_floor_its_imports_allow():
    """As docs/architecture.md says: one floor above the highest module it imports (its listed
    lazy upward imports aside), floor 0 when it imports none; a floor higher than that claims a
    dependency the code does not have."""
    floors, upward = _floors()
    wrong = []
    for name, edges in _graph().items():
        if name == "__init__" or name not in floors:
            continue
        below = [floors[e.target] for e in edges
                 if e.target in floors and e.target != name and not ((name, e.target) in upward and e.lazy)]
        lowest = 1 + max(below) if below else 0
        if floors[name] != lowest:
            wrong.append(f"{name}: floor {floors[name]}, its imports allow {lowest}")
    assert not wrong, "docs/architecture.md's floors:\n" + "\n".join(wrong)


def test_listed_upward_imports_are_lazy_and_still_exist():
    floors, upward = _floors()
    graph = _graph()
    for src, dst in sorted(upward):
        assert src in graph and dst in floors, f"upward {src} -> {dst}: no such module"
        assert floors[dst] >= floors[src], f"upward {src} -> {dst} is not upward: drop the line"
        edges = [e for e in graph[src] if e.target == dst]
        assert edges, f"upward {src} -> {dst} is listed but {_rel(src)} no longer imports {dst}: drop the line"
        eager = [e.line for e in edges if not e.lazy]
        assert not eager, f"{_rel(src)}:{eager} imports {dst} at module level; an upward import must be lazy"


def test_reference_is_imported_by_no_package_module():
    users = [f"{_rel(name)}:{e.line}" for name, edges in _graph().items() for e in edges
             if e.target == "reference"]
    assert not users, f"comet_ext.reference is for tests and benchmarks only; imported by {users}"


def test_import_comet_ext_stays_light():
    """The modules `import comet_ext` runs (module-level imports from __init__ on) import no
    transformers, peft or matplotlib at module level."""
    mods = _modules()
    graph = _graph()
    seen, todo = set(), ["__init__"]
    while todo:
        name = todo.pop()
        if name in seen or name not in mods:
            continue
        seen.add(name)
        todo += [e.target for e in graph[name] if not e.lazy]
    heavy = []
    for name in sorted(seen):
        with open(mods[name], encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:  # module level only (not in functions; conditionals included)
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    break
                roots = ([a.name.split(".")[0] for a in sub.names] if isinstance(sub, ast.Import) else
                         [sub.module.split(".")[0]] if isinstance(sub, ast.ImportFrom) and sub.module and not sub.level
                         else [])
                heavy += [f"{_rel(name)}:{sub.lineno} {r}" for r in roots if r in HEAVY]
    assert not heavy, f"`import comet_ext` would import {heavy}"


# ---------------------------------------------------------------- the file map


def _tree_files() -> list[str]:
    """Files under MAPPED_DIRS: git's tracked and untracked-but-not-ignored files in a checkout
    (build outputs and caches are ignored), else a walk that skips the usual build outputs."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *MAPPED_DIRS],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
        files = [f for f in out if os.path.isfile(os.path.join(ROOT, f))]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for top in MAPPED_DIRS:
            for folder, dirs, names in os.walk(os.path.join(ROOT, top)):
                dirs[:] = [d for d in dirs if d not in ("__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks")]
                for n in names:
                    if not n.endswith((".pyc", ".so", ".pyd", ".dylib")) and n != "_build_info.py":
                        files.append(os.path.relpath(os.path.join(folder, n), ROOT).replace(os.sep, "/"))
    return sorted(f for f in files if not f.startswith(UNMAPPED_DIRS))


def test_every_file_is_in_the_map():
    text = _map_text()
    files = _tree_files()
    assert any(f.startswith("comet_ext/") for f in files) and any(f.startswith("csrc/") for f in files)
    unmapped = [f for f in files if f"`{f}`" not in text]
    assert not unmapped, ("files docs/architecture.md does not name (add a line with the path from the "
                          f"repository root in backquotes): {unmapped}")


def test_every_file_in_the_map_exists():
    text = _map_text()
    named = set(re.findall(r"`((?:" + "|".join(re.escape(d) for d in MAPPED_DIRS) + r")/[^`\s*]+)`", text))
    built = {f"comet_ext/{m}" for m in BUILT_MODULES} | {f"comet_ext/{m}.py" for m in BUILT_MODULES}
    missing = sorted(p for p in named - built
                     if not os.path.exists(os.path.join(ROOT, p.rstrip("/"))))
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


# ---------------------------------------------------------------- one op, one name


def _all_schema_ops() -> list[str]:
    with open(os.path.join(ROOT, "csrc", "comet.cpp"), encoding="utf-8") as f:
        text = f.read()
    ops = re.findall(r'm\.def\(\s*"(\w+)\(', text)
    assert ops, "no m.def(...) schemas found in csrc/comet.cpp"
    return ops


def _schema_ops() -> list[str]:
    return [op for op in _all_schema_ops() if not op.endswith("_backward")]


def _impls(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return set(re.findall(r'm\.impl\(\s*"(\w+)"', f.read()))


def _defs(rel: str) -> set[str]:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("op", _schema_ops())
def test_one_op_one_name(op):
    """Each op of the schema file: its CPU file (the one registering it) names the CUDA file,
    test and benchmark; both backends register it and its backward; ops.py and reference.py
    have a function of its name (a `_functional` twin: its in-place op's oracle)."""
    cpu = [f for f in sorted(os.listdir(os.path.join(ROOT, "csrc", "cpu"))) if f.endswith(".cpp")
           and op in _impls(os.path.join(ROOT, "csrc", "cpu", f))]
    assert len(cpu) == 1, f"comet::{op} is registered by {cpu or 'no file'} in csrc/cpu/ (want exactly one)"
    stem = cpu[0][: -len(".cpp")]
    assert op.startswith(stem), f"comet::{op} lives in csrc/cpu/{cpu[0]}: the file's name is not the op's"
    for rel in (f"csrc/cuda/{stem}.cu", f"python_tests/test_ops_{stem}.py", f"bench/bench_{stem}.py"):
        assert os.path.isfile(os.path.join(ROOT, rel)), f"comet::{op}: {rel} is missing"
    for backend in (f"csrc/cpu/{stem}.cpp", f"csrc/cuda/{stem}.cu"):
        impls = _impls(os.path.join(ROOT, backend))
        assert op in impls, f"{backend} does not register comet::{op}"
        if f"{op}_backward" in _all_schema_ops():
            assert f"{op}_backward" in impls, f"{backend} does not register comet::{op}_backward"
    assert op in _defs("comet_ext/ops.py"), f"comet_ext/ops.py has no {op}()"
    oracle = op.removesuffix("_functional")
    assert oracle in _defs("comet_ext/reference.py"), f"comet_ext/reference.py has no {oracle}()"


# ---------------------------------------------------------------- citations


# The design notes kept outside the repository (docs/architecture.md says where each of their
# topics lives in it); spelled in two parts so that this file does not cite them.
DESIGN_NOTES = "DESIGN" + ".md"


def test_no_citations_of_notes_outside_the_repository():
    """A clone's reader cannot follow a citation of the out-of-repository design notes: cite
    docs/model.md, docs/ops.md, docs/architecture.md or README.md instead."""
    files = _tree_files() + [f for f in ("README.md", "setup.py", "CMakeLists.txt", "pyproject.toml")
                             if os.path.isfile(os.path.join(ROOT, f))]
    citing = []
    for rel in files:
        if rel == "python_tests/test_layout.py" or rel.endswith(".safetensors"):
            continue
        try:
            with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, IsADirectoryError):
            continue  # binary (weights)
        citing += [f"{rel}:{i}" for i, line in enumerate(text.splitlines(), 1) if DESIGN_NOTES in line]
    assert not citing, f"citations of {DESIGN_NOTES}, which is not in the repository: {citing}"
