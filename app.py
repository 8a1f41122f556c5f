"""SpecVLM Studio: `python app.py [--model NAME_OR_PATH] [--draft DIR] [--host H] [--port P]
[--share] [--device cpu|cuda|auto] [--load-in-4bit | --load-in-8bit]`.

The page comes up at once and shows the model loading; a model that cannot be loaded
prints `error: ...` and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # on Hugging Face Spaces (ZeroGPU) GPU work must run inside spaces.GPU
    import spaces
except ImportError:
    spaces = None

from app import AppState, LoadOptions, build_demo, launch  # noqa: E402
from specvlm_core.errors import SpecVLMError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py",
                                description="SpecVLM Studio: plain vs speculative decoding, live.")
    p.add_argument("--model", default=None,
                   help="Hub name or folder of the target VLM (default: the embedded tiny model)")
    p.add_argument("--draft", default=None, help="draft folder (default: the shipped draft of the embedded model)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="4-bit weights (CUDA + bitsandbytes)")
    quant.add_argument("--load-in-8bit", action="store_true", help="8-bit weights (CUDA + bitsandbytes)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    state = AppState(LoadOptions(model=args.model, draft=args.draft, device=args.device,
                                 load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit),
                     gpu=spaces.GPU if spaces is not None else None)
    try:
        state.precheck()
    except SpecVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loader = state.start_loading()
    loader.join(timeout=2.0)  # quick failures (bad flags, missing folder) exit before the server starts
    if state.error:
        print(f"error: {state.error}", file=sys.stderr)
        return 2
    demo = build_demo(state)
    launch(demo, host=args.host, port=args.port, share=args.share, prevent_thread_lock=True)
    loader.join()
    if state.error:
        print(f"error: {state.error}", file=sys.stderr)
        demo.close()
        return 2
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
