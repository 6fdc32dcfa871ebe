"""The report in a real notebook: a notebook built here is executed by nbclient on an ipykernel
kernel of this interpreter; its outputs must hold no warning (tqdm's "IProgress not found"
without ipywidgets) and the HTML report with its failing row marked, which keeps its highlight
under Jupyter's table CSS in chromium."""

import html
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

import layerbisect

from models import corrupt_weights, make_cnn, quant_node_for, quantize
from test_render import CHROMIUM, JUPYTER_TABLE_CSS, STYLE_PROBE, headless_chromium

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
if importlib.util.find_spec("ipykernel") is None:  # found, not imported: it would make this process a notebook
    pytest.skip("ipykernel is not installed", allow_module_level=True)
pytest.importorskip("tqdm")  # the progress bar whose notebook warning is checked

KERNEL = "layerbisect-test"  # a name of our own, in a temporary folder: no user kernel is used
FOLDERS = {"tests": Path(__file__).resolve().parent, "package": Path(layerbisect.__file__).resolve().parent.parent}
CELLS = [
    # the kernel imports tests/models.py and the layerbisect this test imported
    f"import sys\nsys.path[:0] = [{str(FOLDERS['tests'])!r}, {str(FOLDERS['package'])!r}]\nprint(sys.executable)",
    "from layerbisect import find_first_bad_layer\n"
    "from models import corrupt_weights, make_cnn, quantize, random_inputs\n"
    "float_model = make_cnn()\n"
    "broken = corrupt_weights(quantize(float_model, 'qdq'), 'conv2')",
    # four samples: progress() makes a bar (tqdm.auto, imported in the notebook)
    "report = find_first_bad_layer(float_model, broken, [random_inputs(float_model, seed) for seed in range(4)])\n"
    "print('tqdm.auto' in sys.modules)",
    "report",
]
# control, run after the cells above: tqdm.auto imported afresh, without progress()'s filter,
# warns in this kernel when ipywidgets is missing (so the checks below would see that warning)
CONTROL = "for name in ('tqdm.auto', 'tqdm.autonotebook'):\n    sys.modules.pop(name)\nimport tqdm.auto"


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> list:
    """The notebook's cells after execution, on a kernel spec of this interpreter written to a
    temporary Jupyter path (with its own config, runtime and IPython folders)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": KERNEL, "language": "python"}
    (root / "kernels" / KERNEL).mkdir(parents=True)
    (root / "kernels" / KERNEL / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        for variable, folder in {"JUPYTER_PATH": "", "JUPYTER_CONFIG_DIR": "config",
                                 "JUPYTER_RUNTIME_DIR": "runtime", "IPYTHONDIR": "ipython"}.items():
            patch.setenv(variable, str(root / folder))
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell) for cell in CELLS + [CONTROL]])
        nbclient.NotebookClient(notebook, kernel_name=KERNEL, timeout=300,
                                resources={"metadata": {"path": str(root)}}).execute()
    return notebook.cells


def printed(cell) -> str:
    """What the cell printed on stdout."""
    return "".join(output.text for output in cell.outputs if output.get("name") == "stdout")


def test_kernel_is_this_interpreter_and_the_bar_was_made(executed):
    assert "ipykernel" not in sys.modules  # this process stays no notebook for the other tests (progress())
    assert printed(executed[0]) == sys.executable + "\n"
    assert printed(executed[2]) == "True\n"  # progress() imported tqdm.auto


def test_no_warning_and_nothing_on_stderr(executed):
    cells = executed[:len(CELLS)]
    assert [output for cell in cells for output in cell.outputs if output.get("name") == "stderr"] == []
    text = json.dumps([cell.outputs for cell in cells])
    assert "TqdmWarning" not in text and "IProgress" not in text and "Warning" not in text
    if importlib.util.find_spec("ipywidgets") is None:  # the control: the same checks see tqdm's warning
        control = [output.get("text", "") for output in executed[-1].outputs if output.get("name") == "stderr"]
        assert "IProgress not found" in "".join(control) and "TqdmWarning" in "".join(control)


def report_html(executed) -> str:
    """The text/html the report cell displayed."""
    (result,) = [output for output in executed[len(CELLS) - 1].outputs if output.output_type == "execute_result"]
    return result.data["text/html"]


def test_last_cell_shows_the_report_with_its_failing_row_marked(executed):
    shown = report_html(executed)
    assert shown.startswith('<div class="lb lb-report">') and "<style>" in shown
    first = re.findall(r'<tr class="bad first"[^>]*>(.*?)</tr>', shown)
    assert len(first) == 1
    bad_node = quant_node_for(corrupt_weights(quantize(make_cnn(), "qdq"), "conv2"), "conv2")
    assert re.findall(r"<td>([^<]*)</td>", first[0])[1:3] == ["conv2", bad_node]  # float, quantized node


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_failing_row_keeps_its_highlight_under_jupyters_table_css(executed, tmp_path):
    page = tmp_path / "notebook.html"
    page.write_text(f"<!DOCTYPE html><html><head><style>{JUPYTER_TABLE_CSS}</style></head><body>"
                    f'<div class="jp-RenderedHTMLCommon rendered_html">{report_html(executed)}</div>'
                    f'<pre id="styles"></pre>{STYLE_PROBE}</body></html>', encoding="utf-8")
    dom = headless_chromium(page, "--dump-dom").stdout
    styles = json.loads(html.unescape(re.search(r'<pre id="styles">(.*?)</pre>', dom, re.S).group(1)))
    assert styles["bad_cell"] == "rgb(253, 232, 232)" and styles["bad_row"] == "rgba(0, 0, 0, 0)"
    assert styles["good_row"] == "rgba(0, 0, 0, 0)"  # Jupyter's stripe (rgb(245, 245, 245)) undone
