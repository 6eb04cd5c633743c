"""Fixtures of the UI tests: studio services on a tiny (or the pocket) model with a small catalog."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapters_db import HashingEmbedder
from studio.config import StudioConfig
from studio.services import Services, build_services
from tests.ui.fixtures import base_model_dir, model_folder, populate_catalog, write_loras


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One torch thread: the UI tests' tiny generations are fastest so on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def studio_model(tiny_pipeline_dir: Path) -> str:
    """The model id the UI tests run on (pocket when it exists, else the tiny pipeline folder)."""
    return base_model_dir(tiny_pipeline_dir)


@pytest.fixture(scope="session")
def lora_files(tmp_path_factory: pytest.TempPathFactory, studio_model: str) -> dict[str, Path]:
    """The fixture LoRAs, made for the test model."""
    return write_loras(tmp_path_factory.mktemp("ui-loras"), model_folder(studio_model))


def make_services(
    data_dir: Path, model: str, lora_files: dict[str, Path], start_jobs: bool = False
) -> tuple[Services, dict[str, int]]:
    """Services on a fresh data folder with the fixture LoRAs imported."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str(data_dir / "gradio-tmp"))
    config = StudioConfig(data_dir=data_dir, model=model, device="cpu", dtype="fp32")
    services = build_services(config, embedder=HashingEmbedder(128), start_jobs=start_jobs, seed=False)
    ids = populate_catalog(services.catalog, lora_files)
    return services, ids


@pytest.fixture(scope="module")
def studio(
    tmp_path_factory: pytest.TempPathFactory, studio_model: str, lora_files: dict[str, Path]
) -> Iterator[tuple[Services, dict[str, int]]]:
    """Services shared by one test module (tests that change the catalog use ``fresh_studio``)."""
    services, ids = make_services(tmp_path_factory.mktemp("ui-data"), studio_model, lora_files)
    yield services, ids
    services.close()


@pytest.fixture()
def fresh_studio(
    tmp_path: Path, studio_model: str, lora_files: dict[str, Path]
) -> Iterator[tuple[Services, dict[str, int]]]:
    """Services of one test, on their own data folder."""
    services, ids = make_services(tmp_path / "data", studio_model, lora_files)
    yield services, ids
    services.close()
