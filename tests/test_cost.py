"""Issue 20: auto picks the strategy by its estimated cost (layerbisect.cost), not by a fixed rule."""

import numpy as np
import pytest

from layerbisect import find_first_bad_layer
from layerbisect.cost import LAYER_SECONDS, PASS_SECONDS, cheapest, estimates

from test_search_engine import chain

LAYERS = 120
SIZES, QUANT = [2048] * LAYERS, [512] * LAYERS  # 16x32 float32 values, int8 quantized
ONE_A_PASS = [[i] for i in range(LAYERS)]  # a budget that holds one layer a pass


def test_with_one_layer_a_pass_and_no_isolated_error_bisection_is_the_cheapest():
    """The probes take about log2(120 / 8) passes; the prefix a pass a layer, up to the first bad."""
    costs = estimates(SIZES, QUANT, ONE_A_PASS, isolated=False, last_pass=1)
    assert cheapest(costs) == "bisect"
    assert costs["bisect"].passes < 10 < costs["prefix"].passes < costs["scan"].passes == LAYERS
    assert costs["bisect"].seconds < costs["prefix"].seconds < costs["scan"].seconds


def test_with_isolated_error_bisection_adds_its_probes_to_the_prefix():
    """The culprit needs every layer up to the first bad one: bisection measures the prefix's
    pieces after its probes, so it never costs less than the prefix."""
    for pieces in (ONE_A_PASS, [list(range(i, i + 10)) for i in range(0, LAYERS, 10)]):
        costs = estimates(SIZES, QUANT, pieces, isolated=True, last_pass=1)
        assert cheapest(costs) == "prefix"
        assert costs["bisect"].passes > costs["prefix"].passes and costs["bisect"].seconds > costs["prefix"].seconds


def test_when_everything_fits_one_pass_the_scan_costs_no_more_and_is_taken():
    costs = estimates(SIZES, QUANT, [list(range(LAYERS))], isolated=True, last_pass=8)
    assert costs["scan"] == costs["prefix"] and cheapest(costs) == "scan"


def test_the_bytes_of_several_samples_weigh_against_the_sessions_of_many_passes():
    """Sessions are made once a pass, whatever the samples; values are run and compared for
    each sample: more samples make what a pass computes weigh more."""
    one, many = (estimates(SIZES, QUANT, ONE_A_PASS, isolated=False, last_pass=1, samples=s) for s in (1, 100))
    assert many["scan"].passes == one["scan"].passes
    assert many["scan"].seconds - one["scan"].seconds == pytest.approx(
        99 * (one["scan"].seconds - one["scan"].passes * PASS_SECONDS - one["scan"].layers * LAYER_SECONDS))


@pytest.mark.parametrize("isolated, budget, chosen", [(False, 1, "bisect"), (True, 1, "prefix"), (True, None, "scan")])
def test_auto_takes_the_cheapest_estimate_and_gives_the_scans_answer(isolated, budget, chosen):
    """60 MatMul+Tanh layers (120 aligned), the 45th perturbed: at a budget of one layer a pass,
    without isolated error the probes cost least, with it the prefix; with the default budget
    everything fits one pass, and auto scans."""
    noise = [0.0] * 60
    noise[44] = 2.0
    float_model, other = chain([0.0] * len(noise)), chain(noise)
    feeds = {"x": np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)}
    scan = find_first_bad_layer(float_model, other, feeds, strategy="scan", isolated=isolated)
    auto = find_first_bad_layer(float_model, other, feeds, memory_budget=budget, isolated=isolated)
    assert auto.strategy == chosen
    assert scan.first_bad.float_nodes == auto.first_bad.float_nodes == ("mm44",)
    index = lambda layer: None if layer is None else layer.index  # noqa: E731
    assert (auto.first_bad_cause, index(auto.culprit)) == (scan.first_bad_cause, index(scan.culprit))
