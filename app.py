"""Few-shot steerable alignment: the web demo (Hugging Face Spaces entry point).

    python app.py [--bundle DIR] [--port 7860] [--host 127.0.0.1] [--threads 1]

The model is --bundle, else $FSA_BUNDLE, else assets/models/persona-smol when SmolLM2 is
installed, else assets/models/persona-tiny. A GPU is used when present.

torch runs one thread per call (--threads, $FSA_THREADS). The server runs calls side by side
(see demo/ui.py) and a page generation streams two models at once, so a second thread per call
only oversubscribes the 2 cores of a CPU Space. Measured with other work on the 2 cores: the
engine's part of a click took 190-880 ms (median) with 2 threads and 10-23 ms with 1
(benchmarks/demo.py), and plain SmolLM2-135M in bf16 generated 2-8 tokens/s with 2 threads and
26-32 with 1 (32 greedy tokens, batch 1).
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

import torch  # noqa: E402

from demo.handlers import DemoApp  # noqa: E402
from demo.ui import build, configure_queue  # noqa: E402


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="a persona bundle folder (default: see above)")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("FSA_THREADS", "1")),
                    help="torch threads per call (default 1, see above)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    return args


_cli = _args(sys.argv[1:] if __name__ == "__main__" else [])
torch.set_num_threads(_cli.threads)
demo = configure_queue(build(DemoApp(_cli.bundle)))

if __name__ == "__main__":
    demo.launch(server_name=_cli.host, server_port=_cli.port)
