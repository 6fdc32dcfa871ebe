"""Regenerate docs/model-explorer.png, the screenshot the README and docs/quickstart.md show.

Builds the quick start's models (layerbisect.demo: a CNN, its QDQ int8 copy with conv2
broken), runs layerbisect, writes the Model Explorer overlays, starts Model Explorer's local
server on a free port with both models and the cosine overlay on each, takes a screenshot of
the page in headless chromium, and stops the server. Needs the optional packages
(``pip install -e '.[explorer]'``) and chromium; the tests do not run it.

    python docs/screenshots.py [--chromium /usr/bin/chromium]
"""

import argparse
import html
import http.server
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from layerbisect import demo, find_first_bad_layer

ROOT = Path(__file__).resolve().parent.parent

SCREENSHOT = ROOT / "docs" / "model-explorer.png"
SERVER = """
import sys, model_explorer
config = model_explorer.config()
config.add_model_from_path(sys.argv[1])
config.add_model_from_path(sys.argv[2])
config.add_node_data_from_path(sys.argv[3], model_name="cnn_fp32.onnx")
config.add_node_data_from_path(sys.argv[4], model_name="cnn_int8.onnx")
model_explorer.visualize_from_config(config, port=int(sys.argv[5]), no_open_in_browser=True,
                                     extensions=["model_explorer_onnx"])
"""


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def page_url(float_path: Path, int8_path: Path, overlays: Path, port: int) -> str:
    """The address of Model Explorer's page that opens both models with their cosine overlays."""
    import model_explorer

    config = model_explorer.config()
    for path in (float_path, int8_path):
        config.add_model_from_path(str(path))
    config.add_node_data_from_path(str(overlays / "float_cosine.json"), model_name=float_path.name)
    config.add_node_data_from_path(str(overlays / "quant_cosine.json"), model_name=int8_path.name)
    data = json.loads(urllib.parse.unquote(config.to_url_param_value()))
    # the web app's own URL state: the graph's one layer (the ONNX graph) expanded, conv2 selected
    data["uiState"] = {"paneStates": [{"deepestExpandedGroupNodeIds": ["demo_cnn"], "selectedNodeId": "conv2",
                                       "selectedGraphId": "demo_cnn", "selectedCollectionLabel": "",
                                       "widthFraction": 1}]}
    return f"http://localhost:{port}/?data={urllib.parse.quote(json.dumps(data))}"


def wait_for(url: str, server: subprocess.Popen, seconds: float = 60) -> None:
    """Return once ``url`` answers; fail if the server exits or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"Model Explorer's server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"Model Explorer's server did not answer {url} in {seconds:.0f} s")


class Delayed(http.server.BaseHTTPRequestHandler):
    """Serves a page that shows ``page`` (Model Explorer's) full-window in a frame and holds its
    load event back ``seconds`` with an image that answers late: headless chromium takes its
    screenshot on the load event, and a virtual time budget never ends (Model Explorer holds a
    stream to its server open)."""

    page, seconds = "", 20.0

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/late.gif":
            time.sleep(self.seconds)
            body, kind = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif"
        else:
            body = (f'<!DOCTYPE html><html><body style="margin:0"><iframe src="{html.escape(self.page)}" '
                    'style="border:0;width:100vw;height:100vh"></iframe>'
                    '<img src="/late.gif" style="display:none"></body></html>').encode()
            kind = "text/html"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def screenshot(chromium: str, url: str, png: Path, profile: Path) -> None:
    """Save a 1400x900 screenshot of ``url`` to ``png``, once the page has run ``Delayed.seconds``."""
    Delayed.page = url
    with http.server.ThreadingHTTPServer(("localhost", 0), Delayed) as wrapper:
        threading.Thread(target=wrapper.serve_forever, daemon=True).start()
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--window-size=1400,900", f"--screenshot={png}", f"http://localhost:{wrapper.server_port}/"],
            check=True, capture_output=True, timeout=120,
        )
        wrapper.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--output", type=Path, default=SCREENSHOT)
    args = parser.parse_args()
    if not args.chromium:
        raise SystemExit("chromium not found: pass --chromium PATH")
    with tempfile.TemporaryDirectory(prefix="layerbisect-shot-") as tmp:
        folder = Path(tmp)
        float_path, int8_path = demo.save(folder)
        image = {"x": np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)}
        report = find_first_bad_layer(float_path, int8_path, inputs=image, threshold=0.98, quiet=True)
        overlays = folder / "overlays"
        overlays.mkdir()
        report.to_model_explorer(overlays)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(float_path), str(int8_path), str(overlays / "float_cosine.json"),
             str(overlays / "quant_cosine.json"), str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(f"http://localhost:{port}/check_health", server)
            screenshot(args.chromium, page_url(float_path, int8_path, overlays, port), args.output, folder / "profile")
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
