"""No module uses another module's private (``_name``) attributes, functions or classes.

An AST scan of ``curvcore/`` (``backends/`` is installed as ``curvcore.backends``),
``asv_bench/`` and ``docs/examples/``:

* ``from M import _name`` is allowed only when ``_name`` is a *module* and the
  importer is inside the same package (``curvcore`` for the library and its
  backends, the folder itself for ``asv_bench`` and ``docs/examples``);
* ``import M._sub`` / ``from M._sub import name`` likewise (a private module is
  the package's own business);
* ``N._name`` is refused where ``N`` is a name the file imported from this
  repository (a module, a class or function of another module), and ``obj._name`` on any
  other variable when this module does not define ``_name`` itself (an object of another
  module's class); ``self``/``cls`` and the NamedTuple API (``_replace``, ``_fields``,
  ``_asdict``, ``_make``) are fine.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("curvcore", "backends", "asv_bench", "docs/examples")
NAMEDTUPLE_API = {"_replace", "_fields", "_asdict", "_make", "_field_defaults"}

# Known uses in files owned by other work in progress, to be fixed and then removed from here:
# (file, the private name used). Empty this list; never add to it without a plan to remove the entry.
ALLOWED: set[tuple[str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(path: Path) -> str:
    """The package a file belongs to: ``curvcore`` for the library and its backends, else its folder."""
    rel = path.relative_to(ROOT).as_posix()
    return "curvcore" if rel.startswith(("curvcore/", "backends/")) else rel.rsplit("/", 1)[0]


def _module_path(dotted: str, importer: Path, level: int) -> Path | None:
    """The folder or file a (possibly relative) dotted module name refers to, when it is in this repo."""
    if level:
        base = importer.parent
        for _ in range(level - 1):
            base = base.parent
    else:
        first, _, dotted = dotted.partition(".")
        if first == "curvcore":
            base = ROOT / "curvcore"
            if dotted.startswith("backends"):
                base, dotted = ROOT / "backends", dotted[len("backends"):].lstrip(".")
        elif _package_of(importer) != "curvcore" and (importer.parent / f"{first}.py").exists() or (importer.parent / first).is_dir():
            base = importer.parent
            dotted = f"{first}.{dotted}".strip(".")
        elif first in ("asv_bench", "docs"):
            base = ROOT / first
        else:
            return None  # a third-party module
    for part in filter(None, dotted.split(".")):
        base = base / part
    return base


def _is_module(path: Path | None) -> bool:
    return path is not None and (path.with_suffix(".py").exists() or (path / "__init__.py").exists())


def _owner(dotted: str, importer: Path, level: int) -> str | None:
    """The package that owns a module path (``None`` for a third-party one)."""
    path = _module_path(dotted, importer, level)
    if path is None:
        return None
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else ""
    return "curvcore" if rel.startswith(("curvcore", "backends")) else rel.rsplit("/", 1)[0]


def violations(path: Path, source: str | None = None) -> list[tuple[str, str]]:
    """``(where, private name)`` for every use of another module's private name in ``path``
    (or in ``source`` read as if it were at ``path``)."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package, found, imported, foreign = _package_of(path), [], set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = (alias.asname or alias.name).split(".")[0]
                (foreign if _owner(alias.name, path, 0) is None else imported).add(name)
                parts = alias.name.split(".")
                if any(map(_private, parts[1:])) and _owner(alias.name, path, 0) not in (None, package):
                    found.append((f"line {node.lineno}", alias.name))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            owner = _owner(module, path, node.level)
            if owner is None:  # a third-party module: its own conventions
                foreign.update(a.asname or a.name for a in node.names)
                continue
            if any(map(_private, module.split("."))) and owner != package:
                found.append((f"line {node.lineno}", module))
            for alias in node.names:
                imported.add(alias.asname or alias.name)
                if not _private(alias.name):
                    continue
                target = _module_path(f"{module}.{alias.name}", path, node.level)
                if not (_is_module(target) and owner == package):
                    found.append((f"line {node.lineno}", alias.name))
    own = _defined_here(tree)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in NAMEDTUPLE_API
                and isinstance(node.value, ast.Name) and node.value.id not in ("self", "cls", *foreign)):
            continue
        if node.value.id in imported or node.attr not in own:
            found.append((f"line {node.lineno}", f"{node.value.id}.{node.attr}"))
    return found


def _defined_here(tree: ast.Module) -> set[str]:
    """The private names a module defines itself: functions, classes, assigned names and attributes."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
    return {n for n in own if _private(n)}


def _files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))


def test_no_module_uses_another_modules_private_names():
    bad = []
    for path in _files():
        rel = path.relative_to(ROOT).as_posix()
        bad += [f"{rel} {where}: {name}" for where, name in violations(path) if (rel, name) not in ALLOWED]
    assert not bad, "private names used across modules (make them public or keep them inside):\n" + "\n".join(bad)


def test_allowlist_is_current():
    """Every allowlisted use still exists (a fixed one must leave the list)."""
    used = {(p.relative_to(ROOT).as_posix(), name) for p in _files() for _, name in violations(p)}
    assert not ALLOWED - used, f"fixed, remove from ALLOWED: {sorted(ALLOWED - used)}"


def test_the_scan_finds_what_it_must():
    """The scan flags a private function imported from another module and private attributes of
    imported modules and foreign objects, and lets a package import its own private module."""
    src = ("from curvcore.methods._base import _param_names\nfrom curvcore import _checks\n"
           "import asv_bench.common as C\nC._jax_mlp\nfrom curvcore.methods import _layerwise\n"
           "def f(model):\n    return model._skeleton\n")
    inside = [n for _, n in violations(ROOT / "curvcore" / "methods" / "probe.py", src)]
    outside = [n for _, n in violations(ROOT / "asv_bench" / "probe.py", src)]
    assert inside == ["_param_names", "C._jax_mlp", "model._skeleton"]
    assert set(outside) == {"curvcore.methods._base", "_param_names", "_checks", "_layerwise", "C._jax_mlp",
                            "model._skeleton"}
