"""The code in docs/ runs as written."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).parent.parent / "docs"
# The libraries of the `examples` extra: a page importing one that is not installed is
# skipped, not failed.
OPTIONAL = ("flax", "equinox")


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_code_blocks_run(page):
  text = (DOCS / page).read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  for module in OPTIONAL:
    if any(re.search(rf"^\s*(import|from)\s+{module}\b", b, flags=re.M) for b in blocks):
      pytest.importorskip(module, reason=f"{page} needs {module} (the examples extra)")
  namespace = {}
  for block in blocks:
    exec(compile(block, f"{page}", "exec"), namespace)
