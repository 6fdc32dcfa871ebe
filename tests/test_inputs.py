"""The rules for feeding two models that may declare different inputs."""

import numpy as np
import pytest

from layerbisect import LayerbisectError
from layerbisect.inputs import InputSpec, plan_inputs

F32 = np.dtype("float32")
X = InputSpec("x", F32, (1, 3, 4, 5))


def test_shared_input_goes_to_both():
    x = np.ones((1, 3, 4, 5), np.float32)
    float_feeds, quant_feeds = plan_inputs([X], [X]).feeds({"x": x}, seed=0)
    assert float_feeds["x"] is x and quant_feeds["x"] is x


def test_input_declared_by_one_model_goes_to_it_alone_and_is_noted():
    rate = InputSpec("rate", np.dtype("int64"), (1,))
    plan = plan_inputs([X, rate], [X])
    float_feeds, quant_feeds = plan.feeds({"x": np.ones((1, 3, 4, 5), np.float32), "rate": np.array([16000])}, 0)
    assert set(float_feeds) == {"x", "rate"} and set(quant_feeds) == {"x"}
    assert any("'rate'" in note and "float model only" in note for note in plan.notes)


def test_unknown_key_is_an_error_naming_the_known_inputs():
    with pytest.raises(LayerbisectError, match=r"'z' is not an input of either model.*\['x'\]"):
        plan_inputs([X], [X]).feeds({"x": np.ones((1, 3, 4, 5), np.float32), "z": np.ones(1)}, 0)


def test_missing_input_names_model_dtype_shape_and_flag():
    with pytest.raises(LayerbisectError) as info:
        plan_inputs([X], [X]).feeds({}, 0)
    message = str(info.value)
    assert "float model" in message and "'x'" in message and "float32[1,3,4,5]" in message
    assert "--input x=FILE.npy" in message


@pytest.mark.parametrize("array,fix", [
    (np.ones((1, 3, 4, 5)), "x.astype(np.float32)"),
    (np.ones((3, 4, 5), np.float32), "x[None]"),
    (np.ones((3, 4, 5), np.float16), "x[None].astype(np.float32)"),
    (np.ones((1, 4, 5, 3), np.float32), "x.transpose(0, 3, 1, 2)"),
])
def test_wrong_dtype_or_shape_says_the_fix(array, fix):
    got = f"{array.dtype}[{','.join(map(str, array.shape))}]"
    with pytest.raises(LayerbisectError) as info:
        plan_inputs([X], [X]).feeds({"x": array}, 0)
    assert str(info.value) == f"input 'x' of the float model expects float32[1,3,4,5], got {got}: pass {fix}"


def test_a_misspelt_input_or_shape_name_gets_the_closest_one():
    ids = InputSpec("input_ids", np.dtype("int64"), ("batch", 7))
    with pytest.raises(LayerbisectError, match=r"the models take \['input_ids'\]; did you mean 'input_ids'\?$"):
        plan_inputs([ids], [ids]).feeds({"input_id": np.ones((1, 7), np.int64)}, 0)
    with pytest.raises(LayerbisectError, match=r"a shape is given for 'Input_ids'.*; did you mean 'input_ids'\?$"):
        plan_inputs([ids], [ids], shapes={"Input_ids": (1, 7)})
    with pytest.raises(LayerbisectError, match=r"the models take \['input_ids'\]$"):  # nothing close
        plan_inputs([ids], [ids]).feeds({"pixels": np.ones(1)}, 0)


def test_wrong_dtype_and_shape_say_expected_and_got():
    plan = plan_inputs([X], [X])
    with pytest.raises(LayerbisectError, match=r"expects float32\[1,3,4,5\], got float64\[1,3,4,5\]"):
        plan.feeds({"x": np.ones((1, 3, 4, 5))}, 0)
    with pytest.raises(LayerbisectError, match=r"got float32\[1,3,4\]"):
        plan.feeds({"x": np.ones((1, 3, 4), np.float32)}, 0)


def test_random_inputs_cover_the_union_with_equal_values_for_shared_names():
    flag = InputSpec("flag", np.dtype("bool"), (1,))
    ids = InputSpec("ids", np.dtype("int64"), (1, 7))
    float_feeds, quant_feeds = plan_inputs([X, flag], [X, ids]).feeds(None, seed=3)
    assert set(float_feeds) == {"x", "flag"} and set(quant_feeds) == {"x", "ids"}
    np.testing.assert_array_equal(float_feeds["x"], quant_feeds["x"])
    again, _ = plan_inputs([X, flag], [X, ids]).feeds(None, seed=3)
    np.testing.assert_array_equal(again["x"], float_feeds["x"])


def test_dynamic_dimension_needs_a_shape_and_says_which_to_give_in_the_models_own_names():
    dynamic = InputSpec("x", F32, ("batch", 3, 4, 5))
    with pytest.raises(LayerbisectError) as info:
        plan_inputs([dynamic], [dynamic]).feeds(None, 0)
    assert str(info.value) == (
        "input 'x' (float32[batch,3,4,5]) has a dynamic dimension (batch): random inputs need its full "
        "shape, e.g. shapes={'x': (1, 3, 4, 5)} or --shape x=1,3,4,5; or pass real inputs"
    )
    unnamed = InputSpec("x", F32, (None, 3, None, None))
    with pytest.raises(LayerbisectError) as info:
        plan_inputs([unnamed], [unnamed]).feeds(None, 0)
    assert str(info.value) == (
        "input 'x' (float32[?,3,?,?]) has dynamic dimensions (axis 0, axis 2, axis 3): random inputs need "
        "its full shape, e.g. shapes={'x': (1, 3, D2, D3)} or --shape x=1,3,D2,D3 with D2, D3 replaced by "
        "sizes; or pass real inputs"
    )
    text = InputSpec("ids", np.dtype("int64"), ("batch", "sequence"))
    with pytest.raises(LayerbisectError, match=r"shapes=\{'ids': \(1, sequence\)\} or --shape ids=1,sequence "
                       "with sequence replaced by a size"):
        plan_inputs([text], [text]).feeds(None, 0)
    feeds, _ = plan_inputs([dynamic], [dynamic], shapes={"x": (2, 3, 4, 5)}).feeds(None, 0)
    assert feeds["x"].shape == (2, 3, 4, 5)


def test_minus_one_dimension_is_dynamic_as_paddle2onnx_writes_it():
    spec = InputSpec("x", F32, (-1, 3, 4, 5))
    assert spec.shape == (None, 3, 4, 5) and spec.describe() == "float32[?,3,4,5]"
    x = np.ones((2, 3, 4, 5), np.float32)
    assert plan_inputs([spec], [spec]).feeds({"x": x}, 0)[0]["x"] is x


def test_nchw_nhwc_difference_is_bridged_by_permuting():
    nhwc = InputSpec("x", F32, (1, 4, 5, 3))
    plan = plan_inputs([X], [nhwc])
    assert any("permuted" in note for note in plan.notes)
    x = np.arange(60, dtype=np.float32).reshape(1, 3, 4, 5)
    float_feeds, quant_feeds = plan.feeds({"x": x}, 0)
    np.testing.assert_array_equal(quant_feeds["x"], x.transpose(0, 2, 3, 1))
    random_float, random_quant = plan.feeds(None, 0)
    np.testing.assert_array_equal(random_quant["x"], random_float["x"].transpose(0, 2, 3, 1))


def test_other_shape_differences_are_an_error():
    with pytest.raises(LayerbisectError, match="only an NCHW/NHWC difference"):
        plan_inputs([X], [InputSpec("x", F32, (1, 3, 8, 8))])


def test_inputs_named_differently_are_paired_by_position_and_share_values():
    image = InputSpec("image", F32, (1, 3, 4, 5))
    plan = plan_inputs([X], [image])
    assert any("'image' of the quantized model takes the values of input 'x'" in n for n in plan.notes)
    float_feeds, quant_feeds = plan.feeds(None, seed=0)
    np.testing.assert_array_equal(float_feeds["x"], quant_feeds["image"])
    x = np.ones((1, 3, 4, 5), np.float32)
    float_feeds, quant_feeds = plan.feeds({"x": x}, seed=0)
    assert quant_feeds["image"] is x
