"""The code in docs/ runs as written."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).parent.parent / "docs"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_code_blocks_run(page):
  text = (DOCS / page).read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  namespace = {}
  for block in blocks:
    exec(compile(block, f"{page}", "exec"), namespace)
