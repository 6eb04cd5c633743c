"""Per-session state of the studio UI: the mix being built and what the session made and saw.

Frozen and hashable (Gradio compares states by hash to fire ``change`` events); handlers return a
new state instead of mutating one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipelines.recipe import AdapterSpec, finite_number

MAX_MIX = 6


@dataclass(frozen=True)
class MixItem:
    """One adapter of the session's mix with its strengths and per-adapter policy settings."""

    name: str
    sha256: str
    adapter_id: int | None = None
    family: str | None = None
    trigger_words: tuple[str, ...] = ()
    weight: float = 1.0
    te: float = 1.0  # multiplier of the weight in the text encoder
    unet: float = 1.0  # multiplier of the weight in the UNet
    blocks: str = "ALL"  # LoRA-Block-Weight preset or vector (``blocks`` policy)
    schedule: str = "1"  # loractl keyframes ``w@pos, …`` (``schedule`` policy)
    a1111_name: str = ""  # what A1111 finds the file by: its file stem (``<lora:stem:w>``)

    def __post_init__(self) -> None:
        for what, value in (("weight", self.weight), ("te", self.te), ("unet", self.unet)):
            finite_number(value, f"the {what} of {self.name!r}")

    def spec(self) -> AdapterSpec:
        """The recipe entry of this adapter (referenced by content hash)."""
        return AdapterSpec(
            ref=f"sha256:{self.sha256}",
            name=self.name,
            weight=self.weight,
            unet=self.unet,
            te=self.te,
            sha256=self.sha256,
            a1111_name=self.a1111_name,
        )


@dataclass(frozen=True)
class SessionState:
    """Everything one browser session owns; never shared between sessions."""

    mix: tuple[MixItem, ...] = ()
    hits: tuple[tuple[int, str], ...] = ()  # (adapter id, why it matched) of the search cards shown last
    images: tuple[str, ...] = ()  # the images of the last generation (paths in the history folder)
    history_id: str = ""  # history entry of the last generation
    jobs: tuple[str, ...] = ()  # training jobs this session started, newest last
    detail_id: int | None = None  # adapter open in the catalog's detail view
    history_selected: str = ""  # history entry open in the History tab

    def with_mix(self, mix: tuple[MixItem, ...]) -> SessionState:
        """A copy with another mix."""
        return replace(self, mix=tuple(mix))

    def index_of(self, sha256: str) -> int | None:
        """Position of an adapter in the mix, or None."""
        return next((i for i, item in enumerate(self.mix) if item.sha256 == sha256), None)
