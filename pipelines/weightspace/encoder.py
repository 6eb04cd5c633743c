"""A learned encoder from a LoRA's weights to a text-embedding space (AutoLoRA, arXiv 2508.02107).

Per layer l, learnable probes X_l (p × in) are pushed through the update: Y_l = X_l Aᵀ Bᵀ (p × out),
computed from the factors (never the dense ΔW). Y is divided by the adapter's RMS over all layers
(strength-invariant), reduced per layer to a token, a small transformer mixes the layer tokens
(missing layers masked), the mean of the present tokens is projected to the embedder's dimension and
L2-normalised. Trained with the symmetric InfoNCE (CLIP) loss against the text vectors of captions of
each LoRA's pictures. Saved as ``model.safetensors`` + ``config.json`` (no pickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.lora_weights import LoraWeights
from pipelines.weightspace.svd import layer_factors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class EncoderConfig:
    """Layers the encoder reads (module path, in and out width of ΔW as a matrix), sizes, target space."""

    layers: tuple[str, ...]
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    embed_dim: int
    embedder: str = ""
    d_model: int = 64
    n_probes: int = 4
    hidden: int = 16
    heads: int = 4
    depth: int = 2
    dropout: float = 0.1

    @classmethod
    def for_adapters(
        cls, adapters: Sequence[LoraWeights], embed_dim: int, embedder: str = "", **sizes: Any
    ) -> EncoderConfig:
        """The union of the adapters' layers (sorted) with their shapes."""
        shapes: dict[str, tuple[int, int]] = {}
        for weights in adapters:
            for name, layer in weights.layers.items():
                u, v = layer_factors(layer)
                shapes.setdefault(name, (int(v.shape[1]), int(u.shape[0])))
        names = tuple(sorted(shapes))
        return cls(
            layers=names,
            in_dims=tuple(shapes[n][0] for n in names),
            out_dims=tuple(shapes[n][1] for n in names),
            embed_dim=embed_dim,
            embedder=embedder,
            **sizes,
        )

    def to_json(self) -> str:
        """Plain JSON."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        for key in ("layers", "in_dims", "out_dims"):
            data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class Packed:
    """Adapters as padded factor stacks per layer: ``ups[l]`` (N, out, r), ``downs[l]`` (N, r, in)."""

    ups: tuple[torch.Tensor, ...]
    downs: tuple[torch.Tensor, ...]
    present: torch.Tensor  # (N, L) bool

    def select(self, idx: torch.Tensor) -> Packed:
        """A subset of the adapters."""
        return Packed(tuple(u[idx] for u in self.ups), tuple(d[idx] for d in self.downs), self.present[idx])


def pack(adapters: Sequence[LoraWeights], config: EncoderConfig) -> Packed:
    """Factor stacks of the config's layers; layers an adapter lacks (or of another shape) are masked."""
    n = len(adapters)
    ups, downs = [], []
    present = torch.zeros(n, len(config.layers), dtype=torch.bool)
    for li, (name, din, dout) in enumerate(zip(config.layers, config.in_dims, config.out_dims, strict=True)):
        factors: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for weights in adapters:
            layer = weights.layers.get(name)
            uv = layer_factors(layer) if layer is not None else None
            ok = uv is not None and uv[0].shape[0] == dout and uv[1].shape[1] == din
            factors.append(uv if ok else None)
        rank = max((uv[0].shape[1] for uv in factors if uv is not None), default=1)
        u_l, d_l = torch.zeros(n, dout, rank), torch.zeros(n, rank, din)
        for i, uv in enumerate(factors):
            if uv is not None:
                r = uv[0].shape[1]
                u_l[i, :, :r], d_l[i, :r] = uv[0].detach(), uv[1].detach()
                present[i, li] = True
        ups.append(u_l)
        downs.append(d_l)
    return Packed(tuple(ups), tuple(downs), present)


class WeightEncoder(nn.Module):
    """Probes through B·A per layer → tokens → transformer → mean pool → unit vector in text space."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.probes = nn.ParameterList(
            nn.Parameter(torch.randn(c.n_probes, d) / math.sqrt(d)) for d in c.in_dims
        )
        self.reduce = nn.ModuleList(nn.Linear(d, c.hidden) for d in c.out_dims)
        self.token = nn.Linear(c.n_probes * c.hidden, c.d_model)
        self.layer_embedding = nn.Parameter(torch.randn(len(c.layers), c.d_model) * 0.02)
        block = nn.TransformerEncoderLayer(
            c.d_model, c.heads, 2 * c.d_model, c.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.mixer = nn.TransformerEncoder(block, c.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def probe_outputs(self, packed: Packed) -> list[torch.Tensor]:
        """Y_l = X_l Aᵀ Bᵀ per layer, (N, p, out), divided by each adapter's RMS over present layers."""
        ys = [
            (probe @ down.transpose(1, 2)) @ up.transpose(1, 2)
            for probe, up, down in zip(self.probes, packed.ups, packed.downs, strict=True)
        ]
        mask = packed.present.float()
        sq = torch.stack([y.pow(2).mean(dim=(1, 2)) for y in ys], dim=1)
        rms = ((sq * mask).sum(1) / mask.sum(1).clamp_min(1.0)).sqrt().clamp_min(1e-8)
        return [y / rms[:, None, None] for y in ys]

    def forward(self, packed: Packed, drop_layers: torch.Tensor | None = None) -> torch.Tensor:
        """Unit vectors (N, embed_dim); ``drop_layers`` (N, L) bool hides some layers (training)."""
        present = packed.present if drop_layers is None else packed.present & ~drop_layers
        none = present.sum(1) == 0
        present = present.clone()
        present[none, 0] = True  # an adapter with none of the layers: one (zero) token, no NaN
        ys = self.probe_outputs(packed)
        tokens = torch.stack(
            [self.token(F.gelu(red(y)).flatten(1)) for red, y in zip(self.reduce, ys, strict=True)], dim=1
        )
        x = self.mixer(tokens + self.layer_embedding, src_key_padding_mask=~present)
        m = present.float().unsqueeze(-1)
        pooled = (self.norm(x) * m).sum(1) / m.sum(1)
        return F.normalize(self.head(pooled), dim=-1)


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021 fig. 3); ``same`` (N, N) marks pairs that share a
    caption, all of which count as positives (soft targets)."""
    logits = scale * a @ b.T
    target = same.float() / same.float().sum(1, keepdim=True)
    return 0.5 * (
        F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T / target.T.sum(1, keepdim=True))
    )


@dataclass(frozen=True)
class EncoderTrainConfig:
    """Optimisation of :func:`train_encoder`."""

    steps: int = 800
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    layer_drop: float = 0.15
    align_weight: float = 0.5  # + (1 − cos) to the caption vector: a pull that helps tiny data sets
    seed: int = 0


def _caption_bank(text_vectors: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """All caption vectors stacked, and the owner index of each."""
    mats = [np.atleast_2d(np.asarray(v, np.float32)) for v in text_vectors]
    owner = torch.cat([torch.full((len(m),), i, dtype=torch.long) for i, m in enumerate(mats)])
    return F.normalize(torch.from_numpy(np.concatenate(mats)), dim=-1), owner


def check_training_data(
    adapters: Sequence[LoraWeights],
    text_vectors: Sequence[np.ndarray],
    config: EncoderConfig,
    train: EncoderTrainConfig,
) -> None:
    """Refuse what :func:`train_encoder` cannot learn from, with the reason (``ValueError``)."""
    if train.steps < 1 or train.batch_size < 2:
        raise ValueError(f"steps must be ≥ 1 and batch_size ≥ 2, got {train.steps} and {train.batch_size}")
    if not (math.isfinite(train.learning_rate) and train.learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {train.learning_rate}")
    if len(adapters) < 2 or len(adapters) != len(text_vectors):
        raise ValueError(
            f"need two or more adapters, each with its caption vectors: got {len(adapters)} adapters and "
            f"{len(text_vectors)} sets of caption vectors"
        )
    for i, vectors in enumerate(text_vectors):
        mat = np.atleast_2d(np.asarray(vectors, np.float32))
        if mat.size == 0 or mat.ndim != 2 or mat.shape[1] != config.embed_dim:
            raise ValueError(
                f"caption vectors of adapter {i}: shape {mat.shape}, expected (n ≥ 1, {config.embed_dim})"
            )
        if not np.isfinite(mat).all():
            raise ValueError(f"caption vectors of adapter {i} hold NaN or infinite values")
    if not any(covered(config, adapters)):
        raise ValueError("none of the adapters has a layer of the encoder's config (another family?)")


def train_encoder(
    adapters: Sequence[LoraWeights],
    text_vectors: Sequence[np.ndarray],
    config: EncoderConfig,
    train: EncoderTrainConfig = EncoderTrainConfig(),
    progress: Callable[[int, float], None] | None = None,
) -> tuple[WeightEncoder, list[float]]:
    """Fit an encoder: adapter i ↔ its caption vectors ``text_vectors[i]`` ((n_i, D) or (D,)); each step
    draws one caption per adapter of a batch. Returns the encoder (eval mode) and the loss per step."""
    check_training_data(adapters, text_vectors, config, train)
    torch.manual_seed(train.seed)
    gen = torch.Generator().manual_seed(train.seed)
    model = WeightEncoder(config)
    packed = pack(adapters, config)
    bank, owner = _caption_bank(text_vectors)
    per_adapter = [torch.nonzero(owner == i).ravel() for i in range(len(adapters))]
    opt = torch.optim.AdamW(model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, train.learning_rate, total_steps=max(1, train.steps))
    losses: list[float] = []
    model.train()
    n = len(adapters)
    for step in range(train.steps):
        idx = torch.randperm(n, generator=gen)[: train.batch_size]
        pick = torch.stack(
            [per_adapter[i][torch.randint(len(per_adapter[i]), (1,), generator=gen)][0] for i in idx.tolist()]
        )
        text = bank[pick]
        drop = torch.rand(len(idx), len(config.layers), generator=gen) < train.layer_drop
        out = model(packed.select(idx), drop)
        same = (text @ text.T) > 0.999
        loss = clip_loss(out, text, model.logit_scale.exp().clamp(max=100.0), same)
        if train.align_weight:
            loss = loss + train.align_weight * (1.0 - (out * text).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, losses[-1])
    model.eval()
    return model, losses


def covered(config: EncoderConfig, adapters: Sequence[LoraWeights]) -> list[bool]:
    """Whether each adapter has at least one layer the encoder reads (same path and shape); the vector
    of an adapter with none is the same constant for all of them and says nothing."""
    if not adapters:
        return []
    return pack(adapters, config).present.any(dim=1).tolist()


@torch.no_grad()
def encode_weights(model: WeightEncoder, adapters: Sequence[LoraWeights], chunk: int = 64) -> np.ndarray:
    """Unit vectors (N, embed_dim) of adapters in the encoder's text space."""
    model.eval()
    out = [model(pack(adapters[i : i + chunk], model.config)).numpy() for i in range(0, len(adapters), chunk)]
    return np.concatenate(out) if out else np.zeros((0, model.config.embed_dim), np.float32)


def save_encoder(model: WeightEncoder, folder: Path | str) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``folder``, each atomically (temp file +
    rename), the weights first: a reader never sees a half-written file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights_tmp, config_tmp = folder / f".{WEIGHTS_FILE}.tmp", folder / f".{CONFIG_FILE}.tmp"
    try:
        save_file(state, str(weights_tmp))
        config_tmp.write_text(model.config.to_json(), encoding="utf-8")
        weights_tmp.replace(folder / WEIGHTS_FILE)
        config_tmp.replace(folder / CONFIG_FILE)
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
    return folder


def load_encoder(folder: Path | str) -> WeightEncoder:
    """Inverse of :func:`save_encoder` (eval mode). A missing file raises ``FileNotFoundError``, a damaged
    one ``ValueError``, each naming the file (the weights' header is validated before any tensor is read)."""
    from safetensors.torch import load_file

    from pipelines.lora_formats.safetensors_io import read_header

    folder = Path(folder)
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: no such file (a weight encoder is {CONFIG_FILE} + {WEIGHTS_FILE})"
            )
    try:
        model = WeightEncoder(EncoderConfig.from_json(config_file.read_text(encoding="utf-8")))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # not JSON, or not an encoder config
        raise ValueError(
            f"{config_file}: damaged weight encoder config ({type(exc).__name__}: {exc})"
        ) from exc
    read_header(weights_file)  # truncated or foreign files: a specific ValueError naming the file
    try:
        model.load_state_dict(load_file(str(weights_file)))
    except RuntimeError as exc:  # tensors of another encoder (names or shapes)
        raise ValueError(f"{weights_file}: weights do not match {config_file.name} ({exc})") from exc
    return model.eval()


def checkpoint_id(folder: Path | str) -> str:
    """A short content id of a saved encoder (SHA-256 of its weights file, 16 hex chars)."""
    import hashlib

    return hashlib.sha256((Path(folder) / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
