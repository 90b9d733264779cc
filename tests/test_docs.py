"""The documentation runs: every Python snippet of README.md and docs/*.md, and the examples in the
public docstrings.

* Snippets (```python fences) run in order, one namespace per file, in a temporary directory of
  that file, so a snippet may use the names an earlier one of the same page defined.
* A snippet that imports an optional extra's package is skipped, naming the extra, when the
  package is missing (a later snippet that uses its names imports from that package too).
* A snippet that must not run here (a GPU, several processes) has a visible marker on the line
  just before its fence, ``<!-- not-run: reason -->``, with a reason. It is still parsed, and the
  ``blockopt.`` names it uses must exist after a plain ``import blockopt``.
* The docstring examples of the public objects run with :mod:`doctest`, found through
  ``blockopt.<name>``, wherever the code behind the name lives.
"""

from __future__ import annotations

import ast
import doctest
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import blockopt

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not-run:(?P<reason>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[^`]*)$")

#: the package a snippet imports -> the extra that installs it
EXTRAS = {"transformers": "hf", "accelerate": "hf", "lightning": "lightning", "deepspeed": "deepspeed",
          "peft": "test", "pytorch_optimizer": "optimizers", "adam_mini": "official", "triton": "gpu",
          "tokenizers": "bench", "matplotlib": "bench", "rich": "bench", "numpy": "bench"}
#: blockopt modules that need an extra's package to be of any use
BLOCKOPT_EXTRAS = {"blockopt.integrations.hf": "transformers", "blockopt.integrations.deepspeed": "deepspeed"}


@dataclass
class Snippet:
    page: Path
    index: int  # among the page's python snippets
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str | None  # the marker's reason, or None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}#{self.index}"

    def needs(self) -> list[str]:
        """The packages of optional extras this snippet imports."""
        tree = ast.parse(self.code)
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        out = {n.split(".")[0] for n in names if n.split(".")[0] in EXTRAS}
        out |= {pkg for mod, pkg in BLOCKOPT_EXTRAS.items() if any(n == mod or n.startswith(mod + ".") for n in names)}
        return sorted(out)


def parse_page(page: Path) -> tuple[list[Snippet], list[tuple[int, str]]]:
    """The page's python snippets, and every not-run marker as (line, reason)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    snippets, markers = [], []
    i = 0
    while i < len(lines):
        m = NOT_RUN.match(lines[i].strip())
        if m:
            markers.append((i + 1, m.group("reason").strip()))
        f = FENCE.match(lines[i])
        if not f:
            i += 1
            continue
        info, start = f.group("info").strip(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if info.split()[:1] != ["python"]:
            continue
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(prev)
        snippets.append(Snippet(page, len(snippets), start + 1, textwrap.dedent("\n".join(body)) + "\n",
                                marker.group("reason").strip() if marker else None))
    return snippets, markers


SNIPPETS = [s for page in PAGES for s in parse_page(page)[0]]


def test_every_page_is_found_and_has_its_snippets():
    assert ROOT / "README.md" in PAGES and len(PAGES) > 3
    readme = [s for s in SNIPPETS if s.page.name == "README.md"]
    assert any("blockopt.integrations.deepspeed.attach" in s.code  # the snippet that once rotted (README's, now here)
               for s in SNIPPETS if s.page.name == "integrations.md")
    assert any("AdamMini(" in s.code for s in readme)
    assert sum(s.not_run is None for s in SNIPPETS) >= 10


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_not_run_marker_has_a_reason_and_a_snippet(page):
    snippets, markers = parse_page(page)
    marked = {s.line for s in snippets if s.not_run is not None}
    for line, reason in markers:
        assert reason, f"{page.name}:{line}: a not-run marker needs a reason: <!-- not-run: why -->"
        after = [s.line for s in snippets if s.line > line]
        assert after and after[0] in marked, f"{page.name}:{line}: a not-run marker must stand just before a python fence"
    assert len(marked) == len(markers)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' dropped, spaces to '-'."""
    heads = [line.lstrip("#").strip() for line in page.read_text(encoding="utf-8").splitlines()
             if re.match(r"^#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_reach_a_file_and_a_heading(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target!r}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: link to {target!r}: no such heading"


# --- snippets ---------------------------------------------------------------------------------
_pages: dict[Path, dict] = {}  # page -> {"ns": namespace, "done": index of the next snippet, "dir": cwd}


def _run(snippet: Snippet, ns: dict) -> None:
    code = compile(snippet.code, f"{snippet.page.name}:snippet {snippet.index} (line {snippet.line})", "exec")
    exec(code, ns)  # noqa: S102 - the documentation is the code under test


def _missing(snippet: Snippet) -> list[str]:
    return [p for p in snippet.needs() if importlib.util.find_spec(p) is None]


def _advance(page: Path, upto: int, tmp_path_factory, monkeypatch) -> dict:
    """Run the page's snippets before ``upto`` that have not run yet (for -k selections)."""
    state = _pages.setdefault(page, {"ns": {"__name__": "__doc_snippet__"}, "done": 0,
                                     "dir": tmp_path_factory.mktemp(page.stem)})
    monkeypatch.chdir(state["dir"])
    if state["done"] == 0:
        torch.manual_seed(0)
    for s in [s for s in SNIPPETS if s.page == page][state["done"]:upto]:
        state["done"] = s.index + 1
        if s.not_run is None and not _missing(s):
            _run(s, state["ns"])
    return state


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs(snippet, tmp_path_factory, monkeypatch):
    ast.parse(snippet.code)  # every snippet parses, run or not
    state = _advance(snippet.page, snippet.index, tmp_path_factory, monkeypatch)
    state["done"] = snippet.index + 1
    if snippet.not_run is not None:
        pytest.skip(f"not run: {snippet.not_run}")
    missing = _missing(snippet)
    if missing:
        extras = sorted({EXTRAS.get(p, "test") for p in missing})
        pytest.skip(f"needs {', '.join(missing)}: pip install " + " ".join(f"'blockopt[{e}]'" for e in extras))
    _run(snippet, state["ns"])


# --- names: what the docs call, a plain `import blockopt` must have ----------------------------
def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "blockopt":
        return ".".join(["blockopt", *reversed(parts)])
    return None


def _blockopt_names(code: str) -> set[str]:
    """The longest ``blockopt.a.b`` attribute chains of a snippet."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        name = _dotted(node) if isinstance(node, ast.Attribute) else None
        if name and name.count("."):
            names.add(name)
    return {n for n in names if not any(o.startswith(n + ".") for o in names)}


def _missing_attach_message() -> str:
    """The error AdamMini raises at step() when DeepSpeed swapped in parameters and attach was forgotten."""
    model = torch.nn.Linear(4, 4)
    opt = blockopt.AdamMini(model)
    stranger = torch.nn.Parameter(torch.zeros(3))  # what a ZeRO flat partition looks like to it
    stranger.grad = torch.ones(3)
    opt.param_groups[0]["params"].append(stranger)
    with pytest.raises(ValueError, match="not one this optimizer was built with") as info:
        opt.step()
    return str(info.value)


CHECK_NAMES = """
import json, sys
import blockopt
missing = []
for name in json.loads(sys.argv[1]):
    obj = blockopt
    for part in name.split(".")[1:]:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            missing.append(name)
            break
heavy = sorted(m for m in ("transformers", "deepspeed", "lightning", "accelerate") if m in sys.modules)
print(json.dumps({"missing": missing, "heavy": heavy}))
"""


def test_documented_names_exist_after_a_plain_import_blockopt():
    """`import blockopt` then `blockopt.integrations.deepspeed.attach(engine)` (README's spelling, and the
    one AdamMini's error names) works, in a fresh interpreter, without importing any optional package."""
    names = set().union(*(_blockopt_names(s.code) for s in SNIPPETS))
    error_names = set(re.findall(r"blockopt(?:\.\w+)+", _missing_attach_message()))
    assert error_names == {"blockopt.integrations.deepspeed.attach"}
    names |= error_names | {"blockopt.integrations.deepspeed.trainer_callback",
                            "blockopt.integrations.hf.adam_mini_from_training_args"}
    assert "blockopt.integrations.deepspeed.attach" in names
    done = subprocess.run([sys.executable, "-c", CHECK_NAMES, json.dumps(sorted(names))], capture_output=True,
                          text=True, timeout=300, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["missing"] == [], result["missing"]
    assert result["heavy"] == [], f"resolving the documented names imported optional packages: {result['heavy']}"


def test_a_missing_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'integration'"):
        blockopt.integration  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'deep_speed'"):
        blockopt.integrations.deep_speed  # noqa: B018
    assert "integrations" in dir(blockopt) and "deepspeed" in dir(blockopt.integrations)


# --- docstring examples -------------------------------------------------------------------------
DOCTESTED = ["AdamMini", "partition", "calibrate", "MoFO", "blockwise_lr_groups"]


@pytest.mark.parametrize("name", DOCTESTED)
def test_docstring_example_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    obj = getattr(blockopt, name)
    tests = doctest.DocTestFinder(recurse=False).find(obj, f"blockopt.{name}", globs={})
    examples = [e for t in tests for e in t.examples]
    assert len(examples) >= 3, f"blockopt.{name} has no docstring example worth the name"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    torch.manual_seed(0)
    for t in tests:
        runner.run(t, out=report.append)
    assert runner.failures == 0, "".join(report)
    assert runner.tries == len(examples)
