"""What the studio's buttons do, as plain typed functions (no Gradio): one module per tab.

Each handler takes the :class:`~studio.services.Services`, the session's
:class:`~studio.handlers.state.SessionState` and plain values, and returns plain values and a new
state; domain problems raise ``ValueError``/``LookupError``/``FileNotFoundError`` with a message a
person can act on. ``studio.ui`` wires them to Gradio.
"""
