"""Adapter Studio in the browser: ``python app.py`` then open http://127.0.0.1:7860.

Binds 127.0.0.1 unless ``--host`` says otherwise, never opens a share link, sends no analytics, and
runs offline on the bundled pocket model and its catalog.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``user:pass`` → (user, pass)."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth must look like user:password")
    return user, password


def build_parser() -> argparse.ArgumentParser:
    """The launcher's options."""
    from studio.config import default_data_dir

    p = argparse.ArgumentParser(
        prog="python app.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default=os.environ.get("STUDIO_MODEL", "pocket"),
        help="base model: pocket (default), a diffusers folder, a .safetensors file or a Hub id",
    )
    p.add_argument(
        "--data-dir",
        default=str(default_data_dir()),
        help="catalog, files, history, jobs (default: $STUDIO_DATA_DIR, else ~/.adapter-studio)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--auth",
        type=parse_auth,
        default=None,
        metavar="USER:PASS",
        help="require this login (recommended with --host 0.0.0.0)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    p.add_argument(
        "--embedder",
        default=os.environ.get("STUDIO_EMBEDDER") or None,
        help="catalog embedder: auto (default), minilm, hashing[-DIM], open_clip:MODEL:TAG_OR_CHECKPOINT, "
        "open_clip:local-dir:FOLDER",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Build the services, the app, and serve it until interrupted."""
    args = build_parser().parse_args(argv)
    data_dir = Path(args.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(data_dir / "tmp" / "gradio")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from studio.config import StudioConfig
    from studio.services import build_services
    from studio.ui import build_app, launch

    config = StudioConfig(data_dir=data_dir, model=args.model, device=args.device, dtype=args.dtype)
    services = build_services(config, embedder=args.embedder)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.auth is None:
        print(
            f"warning: serving on {args.host} without --auth: anyone who can reach it can use the studio",
            file=sys.stderr,
        )
    demo = build_app(services)
    try:
        launch(demo, services, host=args.host, port=args.port, auth=args.auth)
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        services.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
