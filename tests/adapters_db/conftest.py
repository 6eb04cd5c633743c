"""Catalog fixtures: catalogs on SQLite and (with ``STUDIO_TEST_PG_URL``) on a real PostgreSQL server,
tiny LoRA files, Civitai-format records."""

from __future__ import annotations

import copy
import gzip
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import adapters_db
from adapters_db import Catalog, HashingEmbedder
from pipelines.lora_formats import save_kohya
from pipelines.lora_weights import LoraLayer, LoraWeights
from tests.databases import BACKENDS, fresh_database


def adapter_count(data_dir: Path) -> int:
    """How many adapters the SQLite catalog in ``data_dir`` holds (opened and closed here)."""
    from sqlalchemy import func, select

    from adapters_db.models import Adapter

    cat = adapters_db.open_catalog(None, data_dir)
    try:
        with cat.session() as s:
            return int(s.execute(select(func.count(Adapter.id))).scalar() or 0)
    finally:
        cat.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database dropped afterwards."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def catalog(db_url: str, tmp_path: Path) -> Iterator[Catalog]:
    """An open catalog on each backend, with the fast hashing embedder."""
    cat = adapters_db.open_catalog(db_url, tmp_path / "data", embedder=HashingEmbedder(64))
    yield cat
    cat.dispose()


@pytest.fixture
def sqlite_catalog(tmp_path: Path) -> Iterator[Catalog]:
    """A SQLite-only catalog (for tests about files and processes rather than SQL)."""
    cat = adapters_db.open_catalog(None, tmp_path / "data", embedder=HashingEmbedder(64))
    yield cat
    cat.dispose()


UNET_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def write_lora(
    path: Path, seed: int = 0, metadata: dict[str, str] | None = None, family: str = "sd1"
) -> Path:
    """A small, real kohya LoRA file (one SD-1.5 attention projection, rank 4), written by the project's
    own writer; ``seed`` changes the bytes."""
    g = torch.Generator().manual_seed(seed)
    width = 320
    layer = LoraLayer(
        down=torch.randn(4, width, generator=g), up=torch.randn(width, 4, generator=g), alpha=4.0
    )
    save_kohya(LoraWeights(layers={UNET_Q: layer}, family=family), path, metadata=metadata or {})
    return path


@pytest.fixture
def lora_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``lora_file(name, seed=…, metadata=…)`` → a LoRA file in a fresh folder."""
    counter = itertools.count()

    def make(
        name: str = "adapter.safetensors",
        seed: int | None = None,
        metadata: dict[str, str] | None = None,
        folder: Path | None = None,
    ) -> Path:
        n = next(counter)
        where = folder or tmp_path / f"files{n}"
        where.mkdir(parents=True, exist_ok=True)
        return write_lora(where / name, n if seed is None else seed, metadata)

    return make


def civitai_record(
    model_id: int,
    name: str,
    *,
    trained: list[str] | None = None,
    tags: list[str] | None = None,
    prompts: list[str] | None = None,
    base: str = "SD 1.5",
    description: str = "",
    downloads: int = 100,
    nsfw: bool = False,
    sha256: str | None = None,
    commercial: str = "None",
    file_name: str | None = None,
) -> dict[str, Any]:
    """A Civitai ``/api/v1/models`` item with one version, one file and one image per prompt."""
    version_id = model_id * 10
    images = [
        {
            "id": model_id * 100 + i,
            "url": f"https://image.example/{model_id}/{i}.jpeg",
            "nsfw": "None",
            "width": 512,
            "height": 768,
            "hash": "UABC",
            "meta": {
                "prompt": p,
                "negativePrompt": "lowres",
                "sampler": "Euler a",
                "steps": 20,
                "cfgScale": 7,
                "seed": 42 + i,
            },
        }
        for i, p in enumerate(prompts or [])
    ]
    sha = sha256 or f"{model_id:064x}"
    return {
        "id": model_id,
        "name": name,
        "description": description,
        "type": "LORA",
        "poi": False,
        "nsfw": nsfw,
        "allowNoCredit": True,
        "allowCommercialUse": commercial,
        "allowDerivatives": True,
        "allowDifferentLicense": False,
        "stats": {
            "downloadCount": downloads,
            "favoriteCount": 1,
            "commentCount": 0,
            "ratingCount": 3,
            "rating": 4.5,
        },
        "creator": {"username": "tester"},
        "tags": tags or [],
        "modelVersions": [
            {
                "id": version_id,
                "modelId": model_id,
                "name": "v1.0",
                "createdAt": "2023-05-05T06:46:05.656Z",
                "trainedWords": trained or [],
                "baseModel": base,
                "description": None,
                "stats": {"downloadCount": downloads},
                "files": [
                    {
                        "name": file_name or f"{name.lower().replace(' ', '_')}.safetensors",
                        "id": model_id,
                        "sizeKB": 1.5,
                        "type": "Model",
                        "metadata": {"format": "SafeTensor"},
                        "hashes": {"SHA256": sha.upper(), "AutoV2": sha[:10].upper()},
                        "downloadUrl": f"https://civitai.com/api/download/models/{version_id}",
                        "primary": True,
                    }
                ],
                "images": images,
                "downloadUrl": f"https://civitai.com/api/download/models/{version_id}",
            }
        ],
    }


def write_jsonl(path: Path, records: list[Any], gz: bool = False) -> Path:
    """Records as JSON lines (gzip-compressed with ``gz``)."""
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


SMALL_CATALOG = [
    civitai_record(
        1,
        "Pixel Art Style",
        trained=["pixel art", "8bit"],
        tags=["style", "pixel art"],
        prompts=["pixel art, a castle on a hill, 8bit, retro game", "pixel art, a knight, 8bit"],
        description="<p>Makes <b>pixel art</b> sprites.</p>",
        downloads=5000,
    ),
    civitai_record(
        2,
        "Watercolor Landscapes",
        trained=["wtrclr"],
        tags=["style", "watercolor", "landscape"],
        prompts=["wtrclr, watercolor painting of mountains at dawn", "wtrclr, a lake, soft colors"],
        description="Soft watercolor paintings.",
        downloads=800,
        commercial="Sell",
    ),
    civitai_record(
        3,
        "Hatsune Miku",
        trained=["hatsune miku", "twintails"],
        tags=["character", "anime"],
        prompts=["1girl, hatsune miku, twintails, aqua hair, singing on stage"],
        base="SDXL 1.0",
        downloads=20000,
    ),
    civitai_record(
        4,
        "Cyberpunk City",
        trained=["cyberpunk city"],
        tags=["concept", "city"],
        prompts=["cyberpunk city at night, neon lights, rain, flying cars"],
        downloads=300,
    ),
    civitai_record(
        5,
        "Secret Style",
        trained=["scrtstyl"],
        tags=["style"],
        prompts=["scrtstyl, portrait"],
        nsfw=True,
        downloads=99999,
    ),
    civitai_record(
        6,
        "Detail Tweaker",
        trained=[],
        tags=["tool", "detail"],
        prompts=["masterpiece, best quality, 1girl, highly detailed", "a detailed photo of a cat"],
        description="Adds or removes detail.",
        downloads=129209,
    ),
]


@pytest.fixture
def small_records() -> list[dict[str, Any]]:
    """Six hand-made Civitai records (styles, a character, a concept, an NSFW one, a tool)."""
    return copy.deepcopy(SMALL_CATALOG)


@pytest.fixture
def filled_catalog(catalog: Catalog, small_records: list[dict[str, Any]]) -> Catalog:
    """``catalog`` with the six small records imported and committed."""
    with catalog.session() as s:
        summary = adapters_db.import_civitai_records(s, catalog, ((str(r["id"]), r) for r in small_records))
    assert summary.count("imported") == len(small_records), summary.results
    return catalog
