"""The pocket world: seeded 64×64 pictures of simple objects, with captions.

Base concepts train the pocket model; LoRA-only concepts (``star``, ``heart``, the ``striped``
and ``outline`` styles, the ``neon`` palette) never appear in its data and exist to be learned
later as adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
SUPER = 4  # supersampling factor for anti-aliased edges

BASE_OBJECTS = ("circle", "square", "triangle", "ring")
LORA_OBJECTS = ("star", "heart")
OBJECTS = BASE_OBJECTS + LORA_OBJECTS
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 50, 185),
    "orange": (245, 125, 20),
}
BACKGROUNDS = ("white", "black", "gray", "sky")
SIZES = ("small", "big")
BASE_STYLES = ("solid",)
LORA_STYLES = ("striped", "outline")
STYLES = BASE_STYLES + LORA_STYLES
BASE_PALETTES = ("plain",)
LORA_PALETTES = ("neon",)
PALETTES = BASE_PALETTES + LORA_PALETTES
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "object": OBJECTS,
    "color": tuple(COLORS),
    "background": BACKGROUNDS,
    "size": SIZES,
    "style": STYLES,
    "palette": PALETTES,
}
RADIUS = {"small": (12.0, 14.5), "big": (19.0, 23.0)}


@dataclass(frozen=True)
class Scene:
    """Everything that decides one picture."""

    object: str
    color: str
    background: str
    size: str = "big"
    style: str = "solid"
    palette: str = "plain"
    cx: float = 32.0
    cy: float = 32.0
    radius: float = 21.0
    jitter: tuple[int, int, int] = (0, 0, 0)

    def caption(self, with_size: bool = True) -> str:
        """The scene's caption, e.g. "a big red striped star on a white background"."""
        words = ["a"]
        if with_size:
            words.append(self.size)
        if self.palette != "plain":
            words.append(self.palette)
        words.append(self.color)
        if self.style != "solid":
            words.append(self.style)
        words.append(self.object)
        return " ".join(words) + f" on a {self.background} background"

    def labels(self) -> dict[str, int]:
        """Class index of every attribute."""
        return {k: ATTRIBUTES[k].index(getattr(self, k)) for k in ATTRIBUTES}


def sample_scene(
    rng: np.random.Generator,
    *,
    objects: tuple[str, ...] = BASE_OBJECTS,
    styles: tuple[str, ...] = BASE_STYLES,
    palettes: tuple[str, ...] = BASE_PALETTES,
    **fixed: str,
) -> Scene:
    """A random scene over the given concept sets; ``fixed`` pins attributes by name."""
    pick = {
        "object": fixed.get("object") or objects[rng.integers(len(objects))],
        "color": fixed.get("color") or tuple(COLORS)[rng.integers(len(COLORS))],
        "background": fixed.get("background") or BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        "size": fixed.get("size") or SIZES[rng.integers(len(SIZES))],
        "style": fixed.get("style") or styles[rng.integers(len(styles))],
        "palette": fixed.get("palette") or palettes[rng.integers(len(palettes))],
    }
    lo, hi = RADIUS[pick["size"]]
    radius = float(rng.uniform(lo, hi))
    margin = radius + 3.0
    cx, cy = (float(rng.uniform(margin, SIZE - margin)) for _ in range(2))
    jitter = tuple(int(v) for v in rng.integers(-12, 13, size=3))
    return Scene(**pick, cx=cx, cy=cy, radius=radius, jitter=jitter)  # type: ignore[arg-type]


def _polygon(obj: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal object centred at (cx, cy) with circumradius-like size r."""
    if obj == "square":
        h = r * 0.86
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * 0.15 + r * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if obj == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if obj == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 16.5, cy - y * r / 16.5 - r * 0.05))
        return pts
    raise ValueError(f"not a polygon object: {obj}")


def _mask(scene: Scene, outline: float | None = None) -> Image.Image:
    """Supersampled L-mode mask of the object (filled, or a stroke of width ``outline``)."""
    s = SUPER
    img = Image.new("L", (SIZE * s, SIZE * s), 0)
    d = ImageDraw.Draw(img)
    cx, cy, r = scene.cx * s, scene.cy * s, scene.radius * s
    width = None if outline is None else max(1, round(outline * s))
    if scene.object in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        if outline is None:
            d.ellipse(box, fill=255)
        else:
            d.ellipse(box, outline=255, width=width)
        if scene.object == "ring":
            ri = r * 0.55
            inner = (cx - ri, cy - ri, cx + ri, cy + ri)
            if outline is None:
                d.ellipse(inner, fill=0)
            else:
                d.ellipse(inner, outline=255, width=width)
    else:
        pts = _polygon(scene.object, cx, cy, r)
        if outline is None:
            d.polygon(pts, fill=255)
        else:
            d.line([*pts, pts[0]], fill=255, width=width, joint="curve")
    return img


def _background(name: str, rng_jitter: tuple[int, int, int]) -> np.ndarray:
    """The background as a float32 HxWx3 array in 0..255."""
    j = np.array(rng_jitter, dtype=np.float32) * 0.4
    if name == "white":
        return np.full((SIZE, SIZE, 3), 245.0, np.float32) + j
    if name == "black":
        return np.full((SIZE, SIZE, 3), 18.0, np.float32) + np.abs(j)
    if name == "gray":
        return np.full((SIZE, SIZE, 3), 128.0, np.float32) + j
    if name == "sky":
        t = np.linspace(0.0, 1.0, SIZE, dtype=np.float32)[:, None, None]
        top = np.array([95, 160, 235], np.float32)
        bottom = np.array([205, 228, 252], np.float32)
        return np.broadcast_to(top + (bottom - top) * t, (SIZE, SIZE, 3)).copy() + j
    raise ValueError(f"unknown background: {name}")


def _stripes() -> np.ndarray:
    """Supersampled diagonal stripe pattern (1 on coloured stripes, 0 on light ones)."""
    s = SUPER
    yy, xx = np.mgrid[0 : SIZE * s, 0 : SIZE * s]
    return (((xx + yy) // (4 * s)) % 2 == 0).astype(np.float32)


_STRIPES = _stripes()


def _down(a: np.ndarray) -> np.ndarray:
    """Box-filter a supersampled array back to SIZE×SIZE."""
    s = SUPER
    return a.reshape(SIZE, s, SIZE, s, *a.shape[2:]).mean(axis=(1, 3))


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 64×64 RGB picture."""
    color = np.array(COLORS[scene.color], np.float32) + np.array(scene.jitter, np.float32)
    if scene.palette == "neon":
        color = np.clip((color - color.min()) * 255.0 / max(1.0, float(np.ptp(color))), 0, 255)
    bg = _background(scene.background, scene.jitter)
    fill = np.asarray(_mask(scene), np.float32) / 255.0
    if scene.style == "outline":
        cover = np.asarray(_mask(scene, outline=3.0), np.float32) / 255.0
        paint = cover[..., None] * color
    elif scene.style == "striped":
        rim = np.asarray(_mask(scene, outline=2.0), np.float32) / 255.0
        light = np.full(3, 240.0, np.float32) if scene.background != "white" else np.full(3, 40.0, np.float32)
        stripe = _STRIPES * fill
        cover = fill
        inside = stripe[..., None] * color + ((1 - _STRIPES) * fill)[..., None] * light
        paint = np.where(rim[..., None] > 0, rim[..., None] * color + (1 - rim[..., None]) * inside, inside)
    else:
        cover = fill
        paint = fill[..., None] * color
    cover_d, paint_d = _down(cover), _down(paint)
    if scene.palette == "neon":
        glow = Image.fromarray((cover_d * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3.0))
        g = np.asarray(glow, np.float32)[..., None] / 255.0 * 1.6
        g = np.clip(g, 0.0, 0.85)
        bg = bg * (1 - g) + color * g
    out = bg * (1 - cover_d[..., None]) + paint_d
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), "RGB")


def batch(rng: np.random.Generator, n: int, **kwargs: object) -> tuple[np.ndarray, list[Scene]]:
    """``n`` random scenes rendered as a uint8 array N×64×64×3, with the scenes."""
    scenes = [sample_scene(rng, **kwargs) for _ in range(n)]  # type: ignore[arg-type]
    return np.stack([np.asarray(render(s)) for s in scenes]), scenes


def base_captions(n: int, seed: int) -> tuple[str, ...]:
    """Captions of ``n`` random scenes of base objects (what the pocket model learnt to draw)."""
    rng = np.random.default_rng(seed)
    return tuple(sample_scene(rng, objects=BASE_OBJECTS).caption() for _ in range(n))


def with_attr(scene: Scene, **attrs: str) -> Scene:
    """The same scene with some attributes changed."""
    return replace(scene, **attrs)
