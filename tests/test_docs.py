"""The code in docs/ and in the docstrings runs as written, and the site lists every page."""

import doctest
import importlib
import pathlib
import re

import pytest

from tiers import full

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
PACKAGE = ROOT / "ntk_compiler"
# The libraries of the `examples` extra: a page importing one that is not installed is
# skipped, not failed.
OPTIONAL = ("flax", "equinox")


# libraries.md's Flax / Equinox models also run in tests/test_libraries.py: full tier.
SLOW_PAGES = ("libraries.md",)


@pytest.mark.parametrize("page", [
    pytest.param(name, marks=pytest.mark.full) if name in SLOW_PAGES else name
    for name in sorted(p.name for p in DOCS.glob("*.md"))])
def test_code_blocks_run(page):
  """Every ```python block of a page, in order, in one namespace. (Blocks fenced as
  ```py show code for other libraries, neural_tangents or torch, and are not run.)"""
  text = (DOCS / page).read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  for module in OPTIONAL:
    if any(re.search(rf"^\s*(import|from)\s+{module}\b", b, flags=re.M) for b in blocks):
      pytest.importorskip(module, reason=f"{page} needs {module} (the examples extra)")
  namespace = {}
  for block in blocks:
    exec(compile(block, f"{page}", "exec"), namespace)


def _modules_with_examples():
  for path in sorted(PACKAGE.rglob("*.py")):
    if ">>>" in path.read_text():
      parts = path.relative_to(ROOT).with_suffix("").parts
      yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("name", list(_modules_with_examples()))
def test_docstring_examples_run(name):
  """The `>>>` examples of every docstring in the package (the API reference shows
  them) give the output they show."""
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0, result


def _nav_pages():
  config = (ROOT / "mkdocs.yml").read_text()
  return re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", config, flags=re.M)


def test_every_page_is_on_the_site():
  pages = _nav_pages()
  assert len(pages) == len(set(pages))
  assert sorted(pages) == sorted(p.name for p in DOCS.glob("*.md")), (
      "docs/*.md and the nav of mkdocs.yml must list the same pages")


def test_links_between_pages_resolve():
  for page in DOCS.glob("*.md"):
    for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
      assert (DOCS / target).is_file(), f"{page.name} links to a missing {target}"


@full
def test_site_builds_without_warnings(tmp_path):
  """What CI runs (.ci/run): `mkdocs build --strict`, warnings are errors."""
  mkdocs = pytest.importorskip("mkdocs", reason="the docs extra builds the site")
  del mkdocs
  import subprocess
  import sys
  done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                         "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
