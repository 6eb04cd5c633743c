"""Studio configuration: where data lives, which model and device to use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "pocket"


def default_data_dir() -> Path:
    """``$STUDIO_DATA_DIR`` if set, else ``~/.adapter-studio``."""
    env = os.environ.get("STUDIO_DATA_DIR")
    return Path(env).expanduser().resolve() if env else Path.home() / ".adapter-studio"


@dataclass(frozen=True)
class StudioConfig:
    """Settings fixed at start-up, built once from the command line."""

    data_dir: Path
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        # absolute, so that paths stored from it (training jobs) hold whatever the working directory
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())

    @property
    def catalog_url(self) -> str:
        """SQLAlchemy URL of the catalog (``$STUDIO_DB_URL`` or a SQLite file in the data dir)."""
        return os.environ.get("STUDIO_DB_URL") or f"sqlite:///{self.data_dir / 'catalog.sqlite'}"

    @property
    def files_dir(self) -> Path:
        """Content-addressed adapter files."""
        return self.data_dir / "files"

    @property
    def cache_dir(self) -> Path:
        """Derived data (FAISS index, converted weights)."""
        return self.data_dir / "cache"

    @property
    def history_dir(self) -> Path:
        """Generated images."""
        return self.data_dir / "history"

    @property
    def jobs_dir(self) -> Path:
        """Training jobs: uploads, checkpoints, samples."""
        return self.data_dir / "jobs"
