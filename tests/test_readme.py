"""README claims that code can check: the operator table matches the registry, the support table the family matrix
the tests grow."""

import re
from pathlib import Path

from hf_stack.operators import operator_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_operator_table_matches_registry():
    text = README.read_text()
    block = re.search(r"<!-- operator-table:.*?-->\n(.*?)\n<!-- /operator-table -->", text, re.S)
    assert block, "README lost its operator table markers"
    assert block.group(1).strip() == operator_table()


def test_support_table_is_the_tested_matrix():
    from tests.families import support_table

    text = README.read_text()
    block = re.search(r"<!-- support-table:.*?-->\n(.*?)\n<!-- /support-table -->", text, re.S)
    assert block, "README lost its support table markers"
    assert block.group(1).strip() == support_table()
