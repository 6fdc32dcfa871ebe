"""Reports people look at: terminal, notebook HTML, the saved HTML page (opened in chromium),
DataFrame, matplotlib figure and progress bar, with and without the optional packages."""

import html
import io
import json
import math
import re
import shutil
import subprocess
import sys
import types
import warnings
from dataclasses import replace

import pytest

from layerbisect import find_first_bad_layer
from layerbisect.cli import main
from layerbisect.progress import progress, steps
from layerbisect.render import chart_svg, echo
from layerbisect.report import LayerComparison, Report

from models import corrupt_weights, make_cnn, quantize, random_inputs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report() -> Report:
    float_model = make_cnn()
    broken = corrupt_weights(quantize(float_model, "qdq"), "conv2")
    return find_first_bad_layer(float_model, broken, [random_inputs(float_model, seed) for seed in range(2)])


def layer(index: int, cosine: float, sqnr_db: float) -> LayerComparison:
    return LayerComparison(
        index=index, op_type="Conv", float_nodes=(f"c{index}",), float_tensor=f"c{index}",
        quant_nodes=(f"c{index}",), quant_tensor=f"c{index}", shape=(1,), cosine=cosine, sqnr_db=sqnr_db,
        mse=0.0, max_abs=0.0, cosine_worst=cosine, worst_sample=0, nonfinite=0, evidence="structure",
    )


def bare_report(layers: tuple[LayerComparison, ...]) -> Report:
    """A report built the old way, without the fields added for rendering."""
    bad = next((lay for lay in layers if not lay.passes(0.98)), None)
    return Report(layers=layers, first_bad=bad, threshold=0.98, samples=1, outputs=(), unaligned=(),
                  coverage=1.0, notes=("a note",), float_model="f.onnx", quant_model="q.onnx")


def test_report_knows_models_settings_and_the_first_bad_neighbourhood(report):
    assert report.first_bad.float_nodes == ("conv2",)
    assert report.float_summary.nodes == 14 and ("Conv", 3) in report.float_summary.op_types
    assert dict(report.quant_summary.op_types)["QuantizeLinear"] > 0
    assert report.providers == ("CPUExecutionProvider",) and report.seed == 0 and not report.ort_optimized
    float_names = {node.name: node.distance for node in report.float_neighbourhood}
    assert float_names == {"bn1": 2, "relu1": 1, "conv2": 0, "bn2": 1, "relu2": 2, "add1": 2}
    quant = {node.name: node for node in report.quant_neighbourhood}
    assert quant["conv2"].distance == 0 and "conv2.weight" in "".join(quant["conv2"].inputs)
    weights = [n for n in quant.values() if n.op_type == "DequantizeLinear" and "conv2" in n.outputs[0]]
    assert weights and all(n.distance == 0 for n in weights)  # the weight that was corrupted
    assert not any(n.outputs[0].startswith("bn1.") for n in quant.values())  # other layers' weights left out
    assert report.to_json()  # the new fields stay JSON-friendly


def test_html_is_one_self_contained_page(report, tmp_path):
    path = tmp_path / "report.html"
    report.save_html(path)
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page == report.to_html()
    for needed in ('<svg class="lb-chart"', "threshold 0.98", "first bad: #2 conv2", 'class="bad first"',
                   "Float model", "Quantized model", "CPUExecutionProvider", "Around the first bad layer"):
        assert needed in page
    assert page.count('<svg class="lb-graph"') == 2
    assert page.index('<svg class="lb-chart"') < page.index('<svg class="lb-graph"') < page.index('<details class="lb-layers">')
    assert page.count("<script>") == 1  # inline: filters the table, links the drawings
    for fetched in ("http:", "https:", "<script ", "<link", "<img", "@import", "src=", "fetch(", "import("):
        assert fetched not in page
    assert re.findall(r"url\((.)", page) == ["#"] * page.count("url(")  # only the page's own arrow marker
    assert report._repr_html_() in page


def test_chart_copes_with_gaps_nan_and_inf():
    layers = (layer(0, 1.0, math.inf), layer(3, math.nan, math.nan), layer(5, 0.5, -3.0), layer(6, 0.4, -4.0))
    svg = chart_svg(bare_report(layers))
    assert svg.count("<polyline") == 2  # cosine and SQNR lines, each from 5 to 6 after the NaN gap
    assert 'fill="#fff"' in svg  # inf SQNR drawn hollow at the top
    assert "first bad: #3 c3" in svg and "culprit" not in svg  # a NaN cosine fails
    page = bare_report(layers).to_html()
    assert "Models" not in page and "Around the first bad layer" not in page and "a note" in page


def test_culprit_is_marked_when_it_is_another_layer():
    layers = (layer(0, 0.99, 30.0), layer(1, 0.5, 1.0))
    culprit_report = replace(bare_report(layers), culprit=layers[0])
    assert "culprit: #0 c0" in chart_svg(culprit_report)


def headless_chromium(target, *action) -> subprocess.CompletedProcess:
    """Open the file ``target`` in headless chromium, doing ``action`` (a screenshot, a DOM dump)."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={target.parent / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1200,1600", *action, target.as_uri()],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_saved_page_draws_in_headless_chromium(report, tmp_path):
    page = tmp_path / "report.html"
    report.save_html(page)
    control = tmp_path / "control.html"  # blank, with a script error: proves both checks can fail
    control.write_text("<!DOCTYPE html><html><body><script>no_such_function()</script></body></html>")
    chromium = headless_chromium
    shot, blank = tmp_path / "report.png", tmp_path / "control.png"
    run = chromium(page, f"--screenshot={shot}")
    control_run = chromium(control, f"--screenshot={blank}")
    assert "Uncaught" in control_run.stderr  # console errors do reach stderr
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 5 * blank.stat().st_size  # a drawn page compresses far worse
    dom = chromium(page, "--dump-dom").stdout
    assert '<svg class="lb-chart"' in dom and dom.count("<circle") >= 2 * len(report.layers)
    assert dom.count('<svg class="lb-graph"') == 2 and "<polyline" in dom


# what the page's own script does when used: filters, sort, the jump to the first bad layer (the
# report pushed 3000 px down, so that the jump has to scroll) and the hover over a paired node
USE_PROBE = """<pre id="used"></pre><script>
document.body.insertAdjacentHTML("afterbegin", '<div style="height:3000px"></div>');
const root = document.querySelector(".lb-report"), body = root.querySelector("table.lb-table tbody");
const shown = () => [...body.rows].filter(row => !row.hidden).map(row => Number(row.cells[0].textContent));
const set = (selector, value) => { const control = root.querySelector(selector); control.value = value;
                                   control.dispatchEvent(new Event("input")); };
const used = {open_before: root.querySelector("details.lb-layers").open};
root.querySelector(".lb-bad-only").click();
used.bad_only = shown();
root.querySelector(".lb-bad-only").click();
set(".lb-name", "CONV2"); used.named = shown(); set(".lb-name", "");
set(".lb-op", "Conv"); used.conv = shown(); set(".lb-op", "");
root.querySelectorAll("table.lb-table th")[4].click();  // cosine, lowest first
used.by_cosine = [...body.rows].map(row => Number(row.cells[0].textContent));
used.scroll_before = window.scrollY;
root.querySelector(".lb-jump").click();
const first = body.querySelector("tr.first").getBoundingClientRect();
used.open = root.querySelector("details.lb-layers").open;
used.scrolled = window.scrollY;
used.in_view = first.top >= 0 && first.bottom <= window.innerHeight;
root.querySelector('svg.lb-graph g[data-layer="2"]').dispatchEvent(new Event("mouseenter"));
used.highlighted = [...root.querySelectorAll("g.lb-hl")].map(box => box.closest(".cols > div").querySelector("b").textContent);
document.getElementById("used").textContent = JSON.stringify(used);
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_filters_sorts_jumps_to_the_first_bad_layer_and_links_paired_nodes(report, tmp_path):
    page = tmp_path / "used.html"
    page.write_text(report.to_html().replace("</body>", USE_PROBE + "</body>"), encoding="utf-8")
    run = headless_chromium(page, "--dump-dom")
    assert [line for line in run.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line] == []
    used = json.loads(html.unescape(re.search(r'<pre id="used">(.*?)</pre>', run.stdout, re.S).group(1)))
    layers = report.layers
    assert used["bad_only"] == [lay.index for lay in layers if not lay.passes(report.threshold)] != []
    assert used["named"] == [lay.index for lay in layers if "conv2" in " ".join(lay.float_nodes + lay.quant_nodes)]
    assert used["conv"] == [lay.index for lay in layers if lay.op_type == "Conv"] != used["bad_only"]
    assert used["by_cosine"] == [lay.index for lay in sorted(layers, key=lambda lay: float(f"{lay.cosine:.4f}"))]  # as shown
    assert not used["open_before"] and used["open"] and used["in_view"]
    assert used["scroll_before"] == 0 and used["scrolled"] > 3000
    assert sorted(set(used["highlighted"])) == ["float model", "quantized model"]  # both sides of layer #2


# Jupyter's own rules for tables in cell outputs (JupyterLab's .jp-RenderedHTMLCommon, the
# classic notebook's .rendered_html), as they ship
JUPYTER_TABLE_CSS = """
.jp-RenderedHTMLCommon table{border-collapse:collapse;border-spacing:0;border:none;font-size:12px;
  table-layout:fixed;margin-left:auto;margin-right:auto}
.jp-RenderedHTMLCommon td,.jp-RenderedHTMLCommon th,.jp-RenderedHTMLCommon tr{text-align:right;
  vertical-align:middle;padding:0.5em;line-height:normal;white-space:normal;max-width:none;border:none}
.jp-RenderedHTMLCommon tbody tr:nth-child(odd){background:#f5f5f5}
.jp-RenderedHTMLCommon tbody tr:nth-child(even){background:#ffffff}
.jp-RenderedHTMLCommon tbody tr:hover{background:rgba(66,165,245,0.2)}
.rendered_html tbody tr:nth-child(odd){background:#f5f5f5}
.rendered_html tr,.rendered_html th,.rendered_html td{text-align:right;vertical-align:middle;padding:0.5em}
"""
# what the page reports of the layer table: a failing row's cells and row, a passing row's, a
# number cell, a name cell and the table
STYLE_PROBE = """<script>
const table = document.querySelector(".lb-report table.lb-table");
const bad = table.querySelector("tr.bad"), good = table.tBodies[0].rows[0];  // layer #0, an odd row: striped by Jupyter
const css = (element, property) => getComputedStyle(element)[property];
document.getElementById("styles").textContent = JSON.stringify({
  bad_cell: css(bad.cells[4], "backgroundColor"), bad_row: css(bad, "backgroundColor"),
  good_cell: css(good.cells[4], "backgroundColor"), good_row: css(good, "backgroundColor"),
  number_align: css(good.cells[4], "textAlign"), name_align: css(good.cells[2], "textAlign"),
  table_margin: css(table, "marginLeft")});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_notebook_html_keeps_its_highlight_and_alignment_under_jupyters_table_css(report, tmp_path):
    fragment = report._repr_html_()
    assert 'class="bad' not in fragment.split('class="lb-table"')[1].split("</tr>")[1]  # the probe's passing row
    unstyled = re.sub(r"<style>.*?</style>", "", fragment, flags=re.S)  # control: Jupyter's CSS alone

    def styles(block: str) -> dict:
        page = tmp_path / "notebook.html"
        page.write_text(f"<!DOCTYPE html><html><head><style>{JUPYTER_TABLE_CSS}</style></head><body>"
                        f'<div class="jp-RenderedHTMLCommon rendered_html">{block}</div><pre id="styles"></pre>'
                        f"{STYLE_PROBE}</body></html>", encoding="utf-8")
        dom = headless_chromium(page, "--dump-dom").stdout
        return json.loads(html.unescape(re.search(r'<pre id="styles">(.*?)</pre>', dom, re.S).group(1)))

    assert styles(fragment) == {
        "bad_cell": "rgb(253, 232, 232)", "bad_row": "rgba(0, 0, 0, 0)",
        "good_cell": "rgba(0, 0, 0, 0)", "good_row": "rgba(0, 0, 0, 0)",
        "number_align": "right", "name_align": "left", "table_margin": "0px",
    }
    control = styles(unstyled)  # the same probe sees Jupyter's stripes and alignment without the block's CSS
    assert control["bad_cell"] == "rgba(0, 0, 0, 0)" and control["name_align"] == "right"
    assert control["good_row"] == "rgb(245, 245, 245)"


def test_rich_table_when_rich_is_installed(report):
    console_module = pytest.importorskip("rich.console")
    console = console_module.Console(record=True, width=160, file=io.StringIO())
    console.print(report)
    text = console.export_text()
    assert text.startswith("FAIL: first layer below cosine 0.98 is #2 Conv 'conv2'")
    assert text.index("FAIL") < text.index("float node(s)") < text.index("conv2 ")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_output_is_rich_on_a_terminal_plain_in_pipes(report):
    pytest.importorskip("rich")
    plain, terminal = io.StringIO(), Terminal()
    echo(report, plain)
    echo(report, terminal)
    assert plain.getvalue() == str(report) + "\n"
    assert "─" in terminal.getvalue() and "FAIL" in terminal.getvalue()


def test_terminal_output_without_rich_and_quiet(report, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.console", None)  # rich not installed
    without, quiet = Terminal(), Terminal()
    echo(report, without)
    echo(report, quiet, quiet=True)
    assert without.getvalue() == str(report) + "\n"
    assert quiet.getvalue() == report.verdict + "\n"


def test_dataframe(report):
    pytest.importorskip("pandas")
    frame = report.to_dataframe()
    assert len(frame) == len(report.layers) and frame.index.name == "index"
    assert frame.loc[2, "float_nodes"] == "conv2" and not frame.loc[2, "passes"] and frame.loc[0, "passes"]


def test_plot(report):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    figure = report.plot()
    assert len(figure.axes) == 2 and figure.axes[0].get_ylabel() == "cosine"
    figure.savefig(io.BytesIO(), format="png")
    matplotlib.pyplot.close(figure)


@pytest.mark.parametrize("module,call,message", [
    ("pandas", "to_dataframe", r"to_dataframe\(\) needs pandas.*pip install pandas"),
    ("matplotlib.pyplot", "plot", r"plot\(\) needs matplotlib.*pip install matplotlib"),
])
def test_clear_error_without_the_optional_package(report, monkeypatch, module, call, message):
    monkeypatch.setitem(sys.modules, module, None)  # not installed
    with pytest.raises(ImportError, match=message):
        getattr(report, call)()


def test_progress_bar_on_a_terminal_with_a_total_and_time_left(monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    samples, terminal = [{}, {}, {}], Terminal()
    bar = progress(samples, stream=terminal)
    assert isinstance(bar, tqdm.tqdm) and bar.total == 3 and list(bar) == samples
    streamed = progress(iter(samples), total=3, stream=terminal)  # a generator: the count comes apart
    assert streamed.total == 3 and list(streamed) == samples
    monkeypatch.setattr("layerbisect.progress.DELAY_S", 0)  # show at once, as a long run does after 2 s
    shown = progress(iter(samples), total=3, stream=terminal)
    shown.mininterval = 0
    list(shown)
    assert "3/3 [00:00<00:00" in terminal.getvalue()  # done of total, time taken and time left


def test_progress_bar_over_passes_names_them(monkeypatch):
    pytest.importorskip("tqdm")
    bar = progress([[0], [1], [2]], stream=Terminal(), unit="pass")
    assert bar.desc == "passes" and bar.unit == "pass" and bar.total == 3


def test_no_progress_bar_when_quiet_for_one_sample_off_a_terminal_or_without_tqdm(monkeypatch):
    samples, terminal = [{}, {}, {}], Terminal()
    assert progress(samples, quiet=True, stream=terminal) is samples
    assert progress(samples[:1], stream=terminal) == samples[:1]
    one = iter(samples[:1])
    assert progress(one, total=1, stream=terminal) is one
    assert progress(samples, stream=io.StringIO()) is samples  # redirected: not a terminal
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # not installed
    assert progress(samples, stream=terminal) is samples


def test_notebook_without_ipywidgets_gets_the_text_bar_and_no_warning(monkeypatch):
    tqdm = pytest.importorskip("tqdm")

    class ZMQInteractiveShell:  # the class name tqdm looks for
        pass

    ipython = types.ModuleType("IPython")
    ipython.get_ipython = ZMQInteractiveShell
    for name, module in {"ipykernel": types.ModuleType("ipykernel"), "IPython": ipython,
                         "ipykernel.zmqshell": types.ModuleType("ipykernel.zmqshell"), "ipywidgets": None}.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("tqdm.auto", "tqdm.autonotebook", "tqdm.notebook"):  # imported afresh, in the notebook
        monkeypatch.delitem(sys.modules, name, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bar = progress([{}, {}], stream=io.StringIO())  # a notebook's stderr is no terminal
        assert isinstance(bar, tqdm.std.tqdm) and bar.total == 2 and list(bar) == [{}, {}]
        with steps(2, "model", stream=io.StringIO()) as counted:  # the bars counted by hand too
            assert isinstance(counted.bar, tqdm.std.tqdm) and counted.bar.total == 2
    assert [str(w.message) for w in caught] == []


def test_cli_html_and_quiet(tmp_path, capsys):
    import onnx

    float_model = make_cnn()
    paths = [tmp_path / "f.onnx", tmp_path / "q.onnx"]
    onnx.save(float_model, paths[0])
    onnx.save(corrupt_weights(quantize(float_model, "qdq"), "conv2"), paths[1])
    html = tmp_path / "report.html"
    assert main([str(paths[0]), str(paths[1]), "--html", str(html), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("FAIL")
    page = html.read_text(encoding="utf-8")
    assert str(paths[0]) in page and '<svg class="lb-chart"' in page
    assert main([str(paths[0]), str(paths[1]), "--html", str(tmp_path / "no" / "dir.html")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_repr_is_one_line_and_the_table_is_left_to_print(report):
    assert repr(report) == (f"<Report FAIL, first bad {report.first_bad.describe()}; {len(report.layers)} layers, "
                            "threshold 0.98, 2 samples; print() it for the table>")
    assert repr(report.first_bad) == "<LayerComparison " + report.first_bad.describe() + ">"
    assert repr(bare_report((layer(0, 0.99, 30.0),))) == "<Report PASS; 1 layer, threshold 0.98, 1 sample; print() it for the table>"
    assert replace(report, notes=("other",)) != report and replace(report) == report  # equality kept
    assert "float node(s)" in str(report)
