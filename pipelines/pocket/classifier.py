"""The concept classifier: a small CNN that judges which pocket-world concepts a picture shows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.pocket import world

HEADS: dict[str, int] = {k: len(v) for k, v in world.ATTRIBUTES.items()}


class ConceptClassifier(nn.Module):
    """Four conv blocks, global average pooling, one linear head per attribute."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 96, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(c_in * 2, n) for k, n in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for images in [-1, 1], N×3×64×64."""
        h = self.features(x)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {k: head(h) for k, head in self.heads.items()}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×H×W in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise and small colour shifts so the judge tolerates generated pictures."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 1.2
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    blurred = []
    for i in range(n):  # 64 tiny depthwise convs; cheap next to the CNN
        kx = kern[i].view(1, 1, 1, 5).expand(3, 1, 1, 5)
        ky = kern[i].view(1, 1, 5, 1).expand(3, 1, 5, 1)
        xi = F.conv2d(F.pad(x[i : i + 1], (2, 2, 0, 0), mode="replicate"), kx, groups=3)
        blurred.append(F.conv2d(F.pad(xi, (0, 0, 2, 2), mode="replicate"), ky, groups=3))
    x = torch.cat(blurred)
    x = x + torch.randn(x.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) * 0.08)
    x = x + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.12
    return x.clamp(-1.0, 1.0)


def training_batch(seed: int, step: int, n: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """A deterministic batch of all concepts (base and LoRA-only) for ``step``."""
    rng = np.random.default_rng([seed, step])
    images, scenes = world.batch(rng, n, objects=world.OBJECTS, styles=world.STYLES, palettes=world.PALETTES)
    labels = {k: torch.tensor([s.labels()[k] for s in scenes]) for k in HEADS}
    return images, labels


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Hyper-parameters of the judge's training."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 1234


def train_classifier(cfg: ClassifierTrainConfig, out: Path, progress: bool = True) -> ConceptClassifier:
    """Train the judge on fresh procedural images (AdamW, one-cycle) and save it to ``out``."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    model = ConceptClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = tqdm(range(cfg.steps), desc="classifier", disable=not progress)
    for step in bar:
        images, labels = training_batch(cfg.seed, step, cfg.batch_size)
        logits = model(augment(to_tensor(images), gen))
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    save(model, out)
    return model


def save(model: ConceptClassifier, path: Path) -> None:
    """Write the judge's weights (BatchNorm statistics included) as safetensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load(path: Path) -> ConceptClassifier:
    """Load a saved judge in eval mode."""
    model = ConceptClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def predict(model: ConceptClassifier, images: np.ndarray, batch_size: int = 256) -> dict[str, list[str]]:
    """Attribute names the judge sees in uint8 N×64×64×3 pictures."""
    out: dict[str, list[str]] = {k: [] for k in HEADS}
    for i in range(0, len(images), batch_size):
        logits = model(to_tensor(images[i : i + batch_size]))
        for k, v in logits.items():
            out[k] += [world.ATTRIBUTES[k][j] for j in v.argmax(1).tolist()]
    return out


def accuracy(model: ConceptClassifier, n: int = 2000, seed: int = 99) -> dict[str, float]:
    """Per-attribute accuracy on fresh procedural pictures of every concept."""
    rng = np.random.default_rng(seed)
    images, scenes = world.batch(rng, n, objects=world.OBJECTS, styles=world.STYLES, palettes=world.PALETTES)
    pred = predict(model, images)
    hits = {k: [p == getattr(s, k) for p, s in zip(pred[k], scenes, strict=True)] for k in HEADS}
    return {k: float(np.mean(v)) for k, v in hits.items()}
