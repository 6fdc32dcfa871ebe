"""The bundled examples run and tell their story."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, check=True)
    return result.stdout


def test_quickstart_names_the_broken_convolution():
    out = run("quickstart.py")
    assert out.startswith("FAIL: first layer below cosine 0.98 is #2 Conv 'conv2'")
    assert "first bad layer: ('conv2',)" in out


def test_int8_story_names_the_layer_with_outliers():
    out = run("int8_story.py")
    assert "first layer below cosine 0.98 is #3 MatMul 'fc2'" in out


def test_optimizer_story_names_the_broken_fold():
    out = run("optimizer_story.py")
    assert "first layer below cosine 0.98 is #2 BatchNormalization 'conv2+bn2'" in out
    assert "error introduced there" in out and "GlobalAveragePool_6+Flatten_7" in out


def test_diagnose_story_names_the_culprits_cause_and_a_fix_that_verifies():
    out = run("diagnose_story.py")
    if out.startswith("skipped:"):
        pytest.skip(out.strip())  # the integration extra is not installed
    assert "#9 Relu 'node_conv1d_1+node_relu': own cosine 0.9584; cause: weights" in out
    assert "recommended: per-channel weights for node_conv1d_1+node_relu" in out
    after = float(out.split("output 'stateN': cosine ")[1].split(", ")[1].split(" ")[0])
    assert after > 0.8
