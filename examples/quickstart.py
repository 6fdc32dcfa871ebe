"""Quick start: a float CNN, its int8 copy with one broken layer, and the report that names it.

``layerbisect.demo`` builds a small CNN with onnx.helper, quantizes it to QDQ int8 with
onnxruntime's static quantizer and negates the int8 weights of one convolution ("conv2").
This asks layerbisect where the quantized model stops agreeing with the float one, whether
the error starts there, and which layers to keep in float to repair it.

    python examples/quickstart.py
"""

import tempfile

from layerbisect import demo, find_first_bad_layer, keep_in_float


def main() -> None:
    """Save the models in a temporary folder and print the report and the repair."""
    with tempfile.TemporaryDirectory() as folder:
        float_path, int8_path = demo.save(folder)
        image = demo.image()
        report = find_first_bad_layer(float_path, int8_path, inputs=image, threshold=0.98)
        print(report)
        print()
        print("first bad layer:", report.first_bad.float_nodes if report.first_bad else None)
        print()
        print(keep_in_float(float_path, int8_path, inputs=image, threshold=0.98))


if __name__ == "__main__":
    main()
