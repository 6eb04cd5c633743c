"""The studio's Gradio UI: ``build_app(services) -> gr.Blocks`` and ``launch`` (wiring only; the work is
in ``studio.handlers``)."""

from __future__ import annotations

from studio.ui.app import DOCUMENTED_API, build_app, launch

__all__ = ["DOCUMENTED_API", "build_app", "launch"]
