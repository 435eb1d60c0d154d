"""README claims that code can check: the operator table matches the registry."""

import re
from pathlib import Path

from hf_stack.operators import operator_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_operator_table_matches_registry():
    text = README.read_text()
    block = re.search(r"<!-- operator-table:.*?-->\n(.*?)\n<!-- /operator-table -->", text, re.S)
    assert block, "README lost its operator table markers"
    assert block.group(1).strip() == operator_table()
