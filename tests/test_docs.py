"""The documentation's examples run: every ```pycon block of docs/*.md and README.md is a
doctest, run in a folder holding the demo models under the names the documentation uses
(``layerbisect.demo``: ``cnn_fp32.onnx``, ``cnn_int8.onnx``, ``x.npy``), the blocks of one file
sharing their names in order, as a reader types them.

```python blocks are sketches (signatures, a vendor's simulator, a script to adapt) and do not
run; a block that can run on the demo models is a ```pycon block, so that what it shows is what
it prints.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import numpy as np
import pytest

from layerbisect import demo

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md"])
BLOCK = re.compile(r"^```pycon\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[tuple[int, str]]:
    """The ```pycon blocks of ``page``: the line each starts on, and its text."""
    text = page.read_text()
    return [(text.count("\n", 0, match.start()) + 2, match.group(1)) for match in BLOCK.finditer(text)]


@pytest.fixture()
def demo_folder(tmp_path, monkeypatch):
    demo.save(tmp_path)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("page", [page for page in PAGES if blocks(page)], ids=lambda page: page.name)
def test_examples_of_the_page_print_what_it_shows(page, demo_folder):
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    names: dict = {}
    failures = []
    for line, text in blocks(page):
        test = parser.get_doctest(text, names, f"{page.name}:{line}", str(page), line - 1)
        result = runner.run(test, out=failures.append, clear_globs=False)
        names = test.globs
        assert result.failed == 0, "".join(failures)


def test_some_pages_have_examples_that_run():
    assert {page.name for page in PAGES if blocks(page)} >= {"quickstart.md", "api.md"}
