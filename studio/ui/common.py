"""Glue shared by the tabs: domain errors → ``gr.Error``, warnings → toasts, who is asking."""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from studio.handlers.state import SessionState
from studio.services import Services

log = logging.getLogger("studio.ui")

# Problems a person can act on: their message is shown as is.
DOMAIN_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, OSError, TypeError)


def error_text(exc: BaseException) -> str:
    """The message of an exception (KeyError's without its quotes)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


@contextmanager
def user_errors(action: str) -> Iterator[None]:
    """Turn every exception of a handler into a ``gr.Error`` toast; the server keeps running."""
    try:
        yield
    except gr.Error:
        raise
    except DOMAIN_ERRORS as exc:
        raise gr.Error(
            html.escape(f"{action}: {error_text(exc)}", quote=False), print_exception=False
        ) from exc
    except Exception as exc:
        log.exception("%s failed", action)
        text = (
            f"{action} failed unexpectedly ({type(exc).__name__}: {error_text(exc)}). "
            "The studio is still running; the server log has the details."
        )
        raise gr.Error(html.escape(text, quote=False)) from exc


def warn(messages: Iterable[str]) -> None:
    """Show each message as a warning toast (escaped: toasts render HTML)."""
    for text in messages:
        gr.Warning(html.escape(text, quote=False))


def info(messages: Iterable[str]) -> None:
    """Show each message as an info toast (escaped)."""
    for text in messages:
        gr.Info(html.escape(text, quote=False))


def owner(request: gr.Request | None) -> str:
    """Who owns the history entries of a request: the logged-in user, or "" without ``--auth``."""
    return str(getattr(request, "username", None) or "") if request is not None else ""


def session_key(request: gr.Request | None) -> str:
    """A key for things that belong to one browser session (cancel flags)."""
    return str(getattr(request, "session_hash", None) or "no-session")


class Debouncer:
    """Server-side debounce per session: of calls made within ``delay`` seconds only the last goes on."""

    def __init__(self, delay: float = 0.45) -> None:
        self.delay = delay
        self._lock = threading.Lock()
        self._latest: dict[str, int] = {}

    def settle(self, key: str) -> bool:
        """Wait ``delay``; ``True`` when no newer call of ``key`` came meanwhile."""
        with self._lock:
            ticket = self._latest.get(key, 0) + 1
            self._latest[key] = ticket
        time.sleep(self.delay)
        with self._lock:
            return self._latest.get(key) == ticket


@dataclass
class Ui:
    """The app's services and the components that tabs wire to each other."""

    services: Services
    state: gr.State
    tabs: gr.Tabs
    parts: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.parts[name]

    def add(self, **components: Any) -> None:
        """Register components under names other tabs use."""
        self.parts.update(components)


def initial_state() -> SessionState:
    """The state every new browser session starts from."""
    return SessionState()
