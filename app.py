"""Few-shot steerable alignment: the web demo (Hugging Face Spaces entry point).

    python app.py [--bundle DIR] [--port 7860] [--host 127.0.0.1]

The model is --bundle, else $FSA_BUNDLE, else assets/models/persona-smol when SmolLM2 is
installed, else assets/models/persona-tiny. A GPU is used when present.
"""

from __future__ import annotations

import argparse
import os
import sys

try:  # must come before torch initialises CUDA on ZeroGPU Spaces
    import spaces  # noqa: F401
except ImportError:  # pragma: no cover
    pass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from demo.handlers import DemoApp  # noqa: E402
from demo.ui import build  # noqa: E402


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="a persona bundle folder (default: see above)")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    return ap.parse_args(argv)


_cli = _args(sys.argv[1:] if __name__ == "__main__" else [])
demo = build(DemoApp(_cli.bundle)).queue(default_concurrency_limit=8)

if __name__ == "__main__":
    demo.launch(server_name=_cli.host, server_port=_cli.port)
