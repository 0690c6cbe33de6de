"""The documentation: its code blocks run, the site builds, and every number traces to a results file.

* Every ```python block of every page under ``docs/`` and of ``README.md`` runs.
  The blocks of one page run in order, in one namespace, in a temporary
  directory. A block preceded by ``<!-- no-test: reason -->`` is skipped (for
  GPU or multi-process commands). A block that imports torch, JAX or optax
  (or builds ``cc.backends.mlp("torch"/"jax", ...)``) is skipped with the rest
  of its page when that library is not installed.
* ``mkdocs build --strict`` passes (skipped when the ``docs`` extra is not
  installed).
* No page or experiment script points outside the repository.
* Every generated table equals its script's ``render`` of the committed
  results JSON, and every figure is under ``docs/img/``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXPERIMENTS = DOCS / "experiments"
RESULTS = EXPERIMENTS / "results"
PAGES = sorted(p for p in DOCS.rglob("*.md") if RESULTS not in p.parents) + [ROOT / "README.md"]

FENCE = re.compile(r"^(?P<indent>[ ]*)```python[^\n]*\n(?P<code>.*?)^(?P=indent)```[ ]*$", re.S | re.M)
NO_TEST = re.compile(r"<!--\s*no-test:\s*(?P<reason>[^>]*?)\s*-->\s*$")
OPTIONAL = ("torch", "jax", "optax")
FORBIDDEN = re.compile(r"\.\./shared|shared/spec|shared/seeds|issue #\d+|(?<![\w.])/(?:work|home|tmp|root|Users)/")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def code_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, no-test reason or None)`` for each python block of ``page``, in order."""
    text = page.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = [ln for ln in text[:m.start()].splitlines() if ln.strip()]
        marker = NO_TEST.search(before[-1]) if before else None
        indent = len(m.group("indent"))
        code = "\n".join(ln[indent:] for ln in m.group("code").splitlines())
        blocks.append((line, code, marker.group("reason") if marker else None))
    return blocks


def missing_library(code: str) -> str | None:
    """The first optional library the block uses that is not installed, else None."""
    for lib in OPTIONAL:
        uses = re.search(rf"^\s*(?:import|from)\s+{lib}\b|backends\s+import\s+{lib}\b|mlp\(\s*[\"']{lib}[\"']",
                         code, re.M)
        if uses and importlib.util.find_spec(lib) is None:
            return lib
    return None


PAGES_WITH_CODE = [p for p in PAGES if code_blocks(p)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=rel)
def test_code_blocks_run(page, tmp_path, monkeypatch):
    """The page's python blocks run in order in one namespace (a no-test marker skips one block)."""
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    import matplotlib

    matplotlib.use("Agg")
    jax = sys.modules.get("jax")
    x64 = jax.config.read("jax_enable_x64") if jax is not None else None
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    try:
        for line, code, reason in code_blocks(page):
            if reason is not None:
                continue
            lib = missing_library(code)
            if lib is not None:
                pytest.skip(f"{rel(page)}:{line} and later blocks need {lib}, which is not installed")
            exec(compile(code, f"{rel(page)}:{line}", "exec"), namespace)
    finally:
        jax = sys.modules.get("jax")
        if jax is not None and x64 is not None:
            jax.config.update("jax_enable_x64", x64)


def test_no_test_markers_are_rare():
    """The no-test marker is for GPU or multi-process commands only: a handful at most."""
    marked = [(rel(p), line, reason) for p in PAGES for line, _, reason in code_blocks(p) if reason is not None]
    assert len(marked) <= 5, marked
    assert all(reason for _, _, reason in marked), f"a no-test marker without a reason: {marked}"


def test_nothing_points_outside_the_repository():
    """No ../shared, no spec or seed files, no issue numbers, no absolute paths; relative links stay inside."""
    files = PAGES + sorted(EXPERIMENTS.glob("*.py")) + [ROOT / "mkdocs.yml"]
    problems = []
    for path in files:
        text = path.read_text()
        for m in FORBIDDEN.finditer(text):
            problems.append(f"{rel(path)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}")
        if path.suffix != ".md":
            continue
        for m in LINK.finditer(text):
            target = m.group("target").split("#")[0]
            if not target or re.match(r"[a-z]+:", target):
                continue  # an anchor, or a web address
            resolved = (path.parent / target).resolve()
            if ROOT not in resolved.parents:
                problems.append(f"{rel(path)}: link {target!r} leaves the repository")
            elif not resolved.exists():
                problems.append(f"{rel(path)}: link {target!r} does not exist")
    assert not problems, "\n".join(problems)


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert readme.index("```bash") < readme.index("\n## ")
    assert first.splitlines()[0].startswith("pip install -e . && curvcore compare")
    assert first.splitlines()[1].startswith('pip install -e ".[test]" && python -m pytest')
    assert 'pip install -e ".[docs]" && mkdocs build --strict' in readme


def experiment_scripts() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", experiment_scripts())
def test_generated_tables_match_their_results(name, monkeypatch):
    """``render(results/<name>.json)`` equals the committed table files, which carry the run's date."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    script = importlib.import_module(name)
    common = importlib.import_module("_common")
    data = json.loads((RESULTS / f"{name}.json").read_text())
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", data["date"]) and data["machine"]
    tables = script.render(data)
    for suffix, text in tables.items():
        path = RESULTS / f"{name}{suffix}.md"
        assert path.read_text() == common.generated(name, text), f"{rel(path)} differs from render(); rerun " \
                                                                 f"python docs/experiments/{name}.py --from-json"
        assert data["date"] in text.splitlines()[0]
    pages = [p.read_text() for p in PAGES]
    for suffix in tables:
        snippet = f'--8<-- "experiments/results/{name}{suffix}.md"'
        assert any(snippet in page for page in pages), f"no page includes {snippet}"


def test_every_figure_is_in_docs_img():
    images = [p for ext in ("png", "svg", "jpg") for p in DOCS.rglob(f"*.{ext}")]
    assert images and all(p.parent == DOCS / "img" for p in images), [rel(p) for p in images]


def test_mkdocs_build_strict(tmp_path):
    """``mkdocs build --strict`` (warnings are errors), offline, into a temporary folder."""
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed (it is in the docs extra: pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # no mkdocs-material end-of-life banner
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert not warnings, "\n".join(warnings)
    assert (tmp_path / "index.html").exists()
