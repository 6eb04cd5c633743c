"""Hugging Face model repos: list the repo (``/api/models/{repo}?blobs=true``), download each
``.safetensors`` LoRA (``/{repo}/resolve/{revision}/{file}``), verify it against the LFS SHA-256 the
API reports, then import it with the model card's licence, base model, trigger prompt and tags.
"""

from __future__ import annotations

import html
import re
import urllib.parse
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from adapters_db.dto import ImportResult, ImportSummary, LicenceFlags
from adapters_db.importers.common import run_item
from adapters_db.importers.download import HttpConfig, download_to_store, get_json, get_text
from adapters_db.importers.files import import_file
from adapters_db.importers.sidecars import Sidecars

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Folders of a diffusers pipeline repo: their .safetensors are full models (gigabytes), never LoRAs.
PIPELINE_FOLDERS = frozenset(
    {"unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "safety_checker"}
)
BASE_MODEL_FAMILY = (
    ("xl", "sdxl"),
    ("stable-diffusion-2", "sd2"),
    ("v2-1", "sd2"),
    ("1-5", "sd1"),
    ("v1-5", "sd1"),
    ("1.5", "sd1"),
    ("v1-4", "sd1"),
)


class HuggingFaceClient:
    """The few Hub endpoints the importer needs, on a configurable base URL."""

    def __init__(
        self,
        base_url: str = "https://huggingface.co",
        token: str | None = None,
        config: HttpConfig = HttpConfig(),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.config = replace(config, headers={**config.headers, **headers})

    def model_info(self, repo: str, revision: str = "main") -> dict[str, Any]:
        """Repo metadata with its files (and their LFS SHA-256)."""
        path = f"/api/models/{repo}" if revision == "main" else f"/api/models/{repo}/revision/{revision}"
        return get_json(f"{self.base_url}{path}?blobs=true", self.config)

    def file_url(self, repo: str, filename: str, revision: str = "main") -> str:
        """Download URL of one file."""
        return f"{self.base_url}/{repo}/resolve/{urllib.parse.quote(revision)}/{urllib.parse.quote(filename)}"

    def readme(self, repo: str, revision: str = "main") -> str | None:
        """The model card text (``None`` if the repo has none)."""
        return get_text(self.file_url(repo, "README.md", revision), self.config)


def card_body(readme: str | None) -> str:
    """The model card without its YAML front matter."""
    if not readme:
        return ""
    return re.sub(r"\A---\n.*?\n---\n", "", readme, flags=re.DOTALL).strip()


def family_of_base_model(base_model: Any) -> str | None:
    """``stabilityai/stable-diffusion-xl-base-1.0`` → ``sdxl`` etc. (``None`` when unknown)."""
    names = base_model if isinstance(base_model, list) else [base_model]
    for name in (str(n).lower() for n in names if n):
        for needle, family in BASE_MODEL_FAMILY:
            if needle in name:
                return family
    return None


def _extra(repo: str, info: dict[str, Any], body: str, filename: str) -> dict[str, Any]:
    card = info.get("cardData") if isinstance(info.get("cardData"), dict) else {}
    trigger = card.get("instance_prompt")
    listed = card.get("tags") or info.get("tags")
    tags = [t for t in listed if isinstance(t, str) and ":" not in t] if isinstance(listed, list) else []
    description = "<p>" + html.escape(body[:20000]).replace("\n\n", "</p><p>").replace("\n", "<br>") + "</p>"
    extra: dict[str, Any] = {
        "name": f"{repo.split('/')[-1]} ({filename})"
        if filename != "pytorch_lora_weights.safetensors"
        else repo.split("/")[-1],
        "description_html": description if body else "",
        "tags": tags[:30],
        "source": "huggingface",
        "hf_repo": repo,
        "source_url": f"https://huggingface.co/{repo}",
        "creator": info.get("author") or repo.split("/")[0],
        "licence": LicenceFlags(license=str(card.get("license") or "") or None),
        "file_name": filename,
    }
    if trigger:
        extra["trigger_words"] = [str(trigger)]
    family = family_of_base_model(card.get("base_model"))
    if family:
        extra["base_family"] = family
    return extra


def import_hf_repo(
    session: Session, catalog: Catalog, client: HuggingFaceClient, repo: str, *, revision: str = "main"
) -> ImportSummary:
    """Import every ``.safetensors`` LoRA of a repo (each verified against its LFS SHA-256; one without
    that hash fails unfetched, and files in a diffusers pipeline's folders are skipped)."""
    if not _REPO.match(repo):
        return ImportSummary((ImportResult(repo, "failed", message=f"not a Hugging Face repo id: {repo!r}"),))
    try:
        info = client.model_info(repo, revision)
        body = card_body(client.readme(repo, revision))
    except (OSError, ValueError) as exc:
        return ImportSummary((ImportResult(repo, "failed", message=f"{type(exc).__name__}: {exc}"),))
    siblings = info.get("siblings") if isinstance(info, dict) else None
    if not isinstance(siblings, list):
        return ImportSummary((ImportResult(repo, "failed", message=f"{repo}: not a Hub model listing"),))
    files = [
        s for s in siblings if isinstance(s, dict) and str(s.get("rfilename", "")).endswith(".safetensors")
    ]
    if not files:
        return ImportSummary(
            (ImportResult(repo, "failed", message=f"{repo}: no .safetensors file in the repo"),)
        )
    results = []
    for sibling in files:
        name = str(sibling["rfilename"])
        lfs = sibling.get("lfs")
        sha = lfs.get("sha256") if isinstance(lfs, dict) else None
        url = client.file_url(repo, name, revision)
        if name.split("/")[0] in PIPELINE_FOLDERS:
            why = f"{name}: part of a full diffusers pipeline, not a LoRA (not downloaded)"
            results.append(ImportResult(url, "skipped", message=why))
            continue
        if not isinstance(sha, str):
            why = f"{name}: the Hub lists no LFS SHA-256 for it, so a download could not be verified"
            results.append(ImportResult(url, "failed", message=why))
            continue
        results.append(
            run_item(
                session,
                url,
                lambda u=url, h=sha, n=name: _import_one(
                    session, catalog, client, u, h, _extra(repo, info, body, n)
                ),
            )
        )
    return ImportSummary(tuple(results))


def _import_one(
    session: Session,
    catalog: Catalog,
    client: HuggingFaceClient,
    url: str,
    sha256: str | None,
    extra: dict[str, Any],
) -> ImportResult:
    stored = download_to_store(url, catalog.store, expected_sha256=sha256, config=client.config)
    result = import_file(session, catalog, stored.path, sidecars=Sidecars(), **extra)
    if result.status == "failed" and not stored.existed:
        stored.path.unlink(missing_ok=True)
    if result.status == "failed":
        raise ValueError(result.message)
    return replace(result, source=url)
