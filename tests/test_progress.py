"""Progress on long work, as a terminal shows it: bars over loading both models, aligning them,
each pass of a search (bisection's passes against its bound), and the repaired models that
keep_in_float tries; and nothing with ``quiet`` or off a terminal. The bars are forced to draw
at once (no two-second delay) on a stream that says it is a terminal."""

import io
import logging
import re
import sys
import time

import onnx
import pytest

import layerbisect.progress
from layerbisect import fallback, find_first_bad_layer, keep_in_float
from layerbisect.cli import main
from layerbisect.progress import steps
from layerbisect.search import bisect_calls

from models import corrupt_weights, make_cnn, quant_node_for, quantize, random_inputs

pytest.importorskip("tqdm")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def on_terminal(monkeypatch) -> Terminal:
    """stderr as a terminal, bars drawn at once and at every step. Called in the test itself:
    pytest's capture sets its own stderr once fixtures are set up."""
    stream = Terminal()
    monkeypatch.setattr(layerbisect.progress, "DELAY_S", 0)
    monkeypatch.setattr(layerbisect.progress, "REFRESH_S", 0)
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


@pytest.fixture(scope="module")
def cnn() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    float_model = make_cnn()
    return float_model, corrupt_weights(quantize(float_model, "qdq"), "conv2")


def counts(text: str, desc: str) -> list[tuple[int, int]]:
    """Done and total of each drawing of the bar labelled ``desc``, in order."""
    return [(int(done), int(total)) for done, total in
            re.findall(re.escape(desc) + r":\s+\d+%\|[^|]*\| (\d+)/(\d+) \[", text)]


def passes_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if re.match(r"pass \d+( of [\w ]+)?: ", r.getMessage())]


def test_find_shows_loading_alignment_and_each_bisection_pass_against_its_bound(cnn, caplog, monkeypatch):
    terminal = on_terminal(monkeypatch)
    float_model, broken = cnn
    with caplog.at_level(logging.INFO, logger="layerbisect"):
        # a budget of one byte: bisection probes one layer a pass, to the last one
        report = find_first_bad_layer(float_model, broken, random_inputs(float_model), strategy="bisect",
                                      memory_budget=1)
    assert report.first_bad.float_nodes == ("conv2",)
    text = terminal.getvalue()
    assert counts(text, "loading the float model")[0] == (0, 2)
    assert counts(text, "loading the quantized model")[-1] == (2, 2)
    assert counts(text, "aligning: the float graph")[0] == (0, 3)
    assert counts(text, "aligning: pairing layers")[-1] == (3, 3)
    # the probes, then the culprit's pieces up to the first bad layer: at this budget, one layer
    # a piece, and at most every layer
    bound = bisect_calls(report.aligned, batch=1, probes=1) + report.aligned
    bars = counts(text, f"bisect (at most {bound} passes)")
    logged = passes_logged(caplog)
    assert report.aligned == 10 and bound == 14 and logged[0].startswith(f"pass 1 of at most {bound}: ")
    assert bars[0] == (0, bound) and bars[-1] == (len(logged), bound) and 2 < len(logged) <= bound
    assert [done for done, _ in bars] == list(range(len(logged) + 1))  # one step a pass
    assert text.endswith("\r")  # each bar removed when done


def test_a_one_sample_scan_in_pieces_counts_its_passes_and_several_samples_name_the_pass(cnn, caplog, monkeypatch):
    terminal = on_terminal(monkeypatch)
    float_model, broken = cnn
    whole = find_first_bad_layer(float_model, broken, random_inputs(float_model), quiet=True)
    with caplog.at_level(logging.INFO, logger="layerbisect"):
        report = find_first_bad_layer(float_model, broken, random_inputs(float_model), strategy="scan",
                                      memory_budget=whole.peak_bytes // 4)
    pieces = len(passes_logged(caplog))
    assert len(report.layers) == len(whole.layers) and pieces > 1
    assert counts(terminal.getvalue(), "passes")[-1] == (pieces, pieces)
    terminal.truncate(0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="layerbisect"):
        several = find_first_bad_layer(float_model, broken, [random_inputs(float_model, seed) for seed in range(3)],
                                       strategy="scan", memory_budget=whole.peak_bytes // 4)
    text = terminal.getvalue()
    assert several.samples == 3 and len(passes_logged(caplog)) == pieces
    for number in range(1, pieces + 1):  # each pass's bar over the samples says which pass it is
        assert counts(text, f"pass {number} of {pieces}")[-1] == (3, 3)
    assert counts(text, "passes") == []


def test_keep_in_float_counts_the_repaired_models_it_tries(cnn, monkeypatch):
    terminal = on_terminal(monkeypatch)
    float_model, broken = cnn
    built = []
    original = fallback.bypass
    monkeypatch.setattr(fallback, "bypass", lambda *args: built.append(args[2]) or original(*args))
    fix = keep_in_float(float_model, broken, random_inputs(float_model))
    assert fix.nodes_to_exclude == (quant_node_for(broken, "conv2"),)
    text = terminal.getvalue()
    tried = [int(n) for n in re.findall(r"keep in float: repaired models tried: (\d+) \[", text)]
    # every model measured, once each (the last bypass builds the repaired model handed back)
    assert tried == list(range(len(built))) and len(built) > 3
    assert counts(text, "aligning: pairing layers")[-1] == (3, 3)


def test_nothing_shows_when_quiet_or_off_a_terminal(cnn, monkeypatch):
    terminal = on_terminal(monkeypatch)
    float_model, broken = cnn
    feeds = random_inputs(float_model)
    find_first_bad_layer(float_model, broken, [feeds, feeds], strategy="bisect", memory_budget=1, quiet=True)
    keep_in_float(float_model, broken, feeds, quiet=True)
    assert terminal.getvalue() == ""
    redirected = io.StringIO()
    monkeypatch.setattr(sys, "stderr", redirected)
    find_first_bad_layer(float_model, broken, [feeds, feeds], strategy="bisect", memory_budget=1)
    keep_in_float(float_model, broken, feeds)
    assert redirected.getvalue() == ""


def test_the_cli_shows_every_bar_on_a_terminal_and_none_with_quiet(cnn, tmp_path, capsys, monkeypatch):
    terminal = on_terminal(monkeypatch)
    paths = [str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx")]
    for model, path in zip(cnn, paths):
        onnx.save(model, path)
    args = [*paths, "--strategy", "bisect", "--memory-budget", "1K", "--keep-float", str(tmp_path / "keep.json")]
    assert main(args) == 1
    text = terminal.getvalue()
    assert counts(text, "loading the quantized model")[-1] == (2, 2)
    assert counts(text, "aligning: pairing layers")[-1] == (3, 3)
    assert re.search(r"bisect \(at most (\d+) passes\):\s+0%\|[^|]*\| 0/\1 \[", text)
    assert re.search(r"keep in float: repaired models tried: [1-9]\d* \[", text)
    terminal.truncate(0)
    terminal.seek(0)
    assert main([*args, "--quiet"]) == 1
    text = terminal.getvalue()
    assert not re.search(r"\d/\d+ \[|tried: \d+ \[", text) and "nodes_to_exclude" in text  # the summary, no bar
    assert capsys.readouterr().out.startswith("FAIL")


def test_a_long_step_shows_its_bar_and_time_before_it_ends(monkeypatch):
    monkeypatch.setattr(layerbisect.progress, "DELAY_S", 0.05)  # nothing at first, as a long run's first 2 s
    monkeypatch.setattr(layerbisect.progress, "TICK_S", 0.01)
    stream = Terminal()
    with steps(2, "model", desc="loading the float model", stream=stream):
        assert stream.getvalue() == ""
        for _ in range(1000):  # no step ends: the ticker draws the bar once past the delay
            if "0/2 [" in stream.getvalue():
                break
            time.sleep(0.01)
        assert counts(stream.getvalue(), "loading the float model")[0] == (0, 2)
    assert stream.getvalue().endswith("\r")


def test_a_bar_left_unclosed_is_closed_when_dropped():
    stream = Terminal()
    bar = steps(3, "pass", stream=stream)
    ticker = bar.bar  # the tqdm bar
    del bar
    assert ticker.disable  # closed (tqdm disables a closed bar)


def test_quiet_steps_do_nothing():
    bar = steps(3, "pass", quiet=True, stream=Terminal())
    assert bar.bar is None
    bar.advance("next")
    bar.close()
