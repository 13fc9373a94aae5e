"""`hf-vitseg app MODEL_OR_FOLDER [--port N]`: a web page to try a model: upload an image, see the segmentation.

    hf-vitseg app runs/nuclei                      # then open http://127.0.0.1:7860
    hf-vitseg app username/my-model --port 8080 --host 0.0.0.0

The page (Gradio, the Hub's Spaces convention; `pip install "hf-vitseg[app]"`) shows the overlay with its legend,
a table of the area of every class present and a download of the label map (a PNG of class ids). Prediction is
`hf-vitseg predict`'s: images larger than about 1800 x 1800 pixels (at patch size 14) are predicted in sliding
windows (`--crop-size`, `--stride` choose them; `--sliding-window` uses them for every image). It works offline:
no CDN, no analytics, no share link. Stop it with Ctrl+C. `hf-vitseg push FOLDER REPO --space SPACE` deploys the
same page as a Hugging Face Space.
"""

from __future__ import annotations

import argparse
import errno
import socket

from .args import (
    CliError,
    add_window_flags,
    bounded_number,
    check_device,
    check_model_folder,
    loading,
    model_source,
    report,
    size_pair,
    unit_float,
)


def port_number(text: str) -> int:
    """A TCP port, 1..65535."""
    return bounded_number(int, text, lambda v: 1 <= v <= 65535, "a port number in 1..65535")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_FOLDER", help="a saved model folder or a Hub repo id")
    parser.add_argument("--port", type=port_number, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0: the network)")
    parser.add_argument("--sliding-window", action="store_true", help="predict every image window by window")
    add_window_flags(parser)
    parser.add_argument("--alpha", type=unit_float, default=0.5, help="weight of the class colours in the overlay")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")


def check_port_free(host: str, port: int) -> None:
    """A `CliError` naming `--port` (or `--host`) when the server could not listen there."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise CliError(f"--port {port}: already in use on {host}; choose another port.") from None
            raise CliError(f"--host {host} --port {port}: cannot listen there ({error.strerror}).") from None


def run(args: argparse.Namespace) -> int:
    """Serve the page until interrupted; returns 1 (with the reason on stderr, one line) on bad input."""
    try:
        from ..inference.app import SegmentationApp, import_gradio, launch

        import_gradio()
        source = model_source(args.model, "MODEL_OR_FOLDER")
        check_model_folder(source, "MODEL_OR_FOLDER")
        device = check_device(args.device)
        size_pair(args.crop_size, "--crop-size")
        size_pair(args.stride, "--stride")
        check_port_free(args.host, args.port)
        with loading("MODEL_OR_FOLDER", source, errors=(OSError, ValueError)):
            app = SegmentationApp.from_pretrained(source, device=device, sliding_window=args.sliding_window,
                                                  crop_size=args.crop_size, stride=args.stride, alpha=args.alpha)
        page = app.build()
    except (ValueError, OSError, ImportError) as error:
        return report("app", error)
    try:
        launch(page, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
    return 0
