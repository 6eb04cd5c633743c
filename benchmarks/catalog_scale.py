"""Catalog at scale: a synthetic 100,000-adapter catalog (clustered vectors, realistic text).

Generates Civitai-format records (names, tags, trained words, descriptions and two preview prompts
each, drawn from topic clusters), imports them with the real importer, embeds them with a synthetic
embedder whose vectors cluster by topic (like sentence embeddings do; uniform noise would flatter an
approximate index), builds the search index (HNSW past 50,000 vectors) and measures:

- import and index build time;
- dense search latency (HNSW) and recall@10 of HNSW against exact (flat) search;
- latency of the full hybrid ``search()`` (all channels) per query;
- candidate-first scoring (``adapters_db.pruning``, on from 30,000 adapters) against exhaustive scoring
  of every adapter in the same run: CPU per query, the share of the exhaustive top 10 it finds, and
  how many rows it featurises.

    python benchmarks/catalog_scale.py                 # 100,000 adapters
    python benchmarks/catalog_scale.py --adapters 20000 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STYLES = [
    "watercolor",
    "pixel art",
    "ink sketch",
    "oil painting",
    "cel shading",
    "ukiyo-e",
    "art nouveau",
    "cyberpunk",
    "steampunk",
    "low poly",
    "vaporwave",
    "charcoal",
    "gouache",
    "line art",
    "papercut",
    "claymation",
    "film noir",
    "pastel",
    "isometric",
    "stained glass",
]
SUBJECTS = [
    "cat",
    "castle",
    "girl",
    "robot",
    "forest",
    "dragon",
    "city street",
    "portrait",
    "spaceship",
    "knight",
    "mermaid",
    "samurai",
    "witch",
    "car",
    "flower field",
    "mountain lake",
    "cafe",
    "train",
    "lighthouse",
    "wolf",
    "owl",
    "armor",
    "kimono",
    "school uniform",
    "ballgown",
]
QUALITY = [
    "masterpiece",
    "best quality",
    "highly detailed",
    "8k",
    "sharp focus",
    "soft lighting",
    "cinematic lighting",
    "depth of field",
    "ultra detailed",
    "intricate",
]
KINDS = ["Style", "LoRA", "Concept", "Character", "Outfit", "Pose", "Background", "Tweaker"]
SYLLABLES = [
    "ka",
    "ri",
    "zo",
    "mel",
    "tan",
    "vor",
    "shi",
    "lu",
    "ne",
    "qua",
    "dex",
    "bri",
    "on",
    "ta",
    "mi",
    "sol",
    "vek",
    "ra",
    "yu",
    "ph",
]
BASES = ["SD 1.5", "SD 1.5", "SD 1.5", "SDXL 1.0", "SD 2.1"]


def word(rng: np.random.Generator, parts: int = 3) -> str:
    """A made-up word (character names, trigger tokens)."""
    return "".join(rng.choice(SYLLABLES, parts))


def topic(cluster: int) -> tuple[str, str]:
    """The (style, subject) pair of a cluster."""
    return STYLES[cluster % len(STYLES)], SUBJECTS[(cluster // len(STYLES)) % len(SUBJECTS)]


def record(i: int, clusters: int, rng: np.random.Generator) -> dict[str, Any]:
    """One Civitai-format record of a random topic cluster."""
    cluster = int(rng.integers(0, clusters))
    style, subject = topic(cluster)
    trigger = f"{word(rng)}{i}"
    name = f"{word(rng, 2).title()} {style.title()} {subject.title()} {rng.choice(KINDS)}"
    tags = [style, subject, str(rng.choice(["style", "concept", "character", "clothing", "background"]))]
    prompts = [
        ", ".join(
            [
                str(rng.choice(QUALITY)),
                trigger,
                style,
                subject,
                *rng.choice(QUALITY, 3),
                str(rng.choice(SUBJECTS)),
            ]
        )
        for _ in range(2)
    ]
    description = (
        f"<p>A {style} LoRA for {subject} pictures. Use <b>{trigger}</b> at 0.7-0.9.</p>"
        f"<p>Trained on {int(rng.integers(20, 400))} images; works with most {style} checkpoints.</p>"
    )
    return {
        "id": 10_000_000 + i,
        "name": name,
        "description": description,
        "type": "LORA",
        "nsfw": False,
        "allowNoCredit": True,
        "allowCommercialUse": str(rng.choice(["None", "Image", "Sell"])),
        "allowDerivatives": True,
        "allowDifferentLicense": bool(rng.integers(0, 2)),
        "stats": {
            "downloadCount": int(rng.pareto(1.2) * 100),
            "favoriteCount": 0,
            "commentCount": 0,
            "ratingCount": 1,
            "rating": 4.0,
        },
        "creator": {"username": word(rng, 2)},
        "tags": tags,
        "modelVersions": [
            {
                "id": 20_000_000 + i,
                "name": "v1.0",
                "createdAt": "2023-06-01T00:00:00Z",
                "trainedWords": [trigger],
                "baseModel": str(rng.choice(BASES)),
                "files": [
                    {
                        "name": f"{trigger}.safetensors",
                        "sizeKB": 18000.0,
                        "type": "Model",
                        "metadata": {"format": "SafeTensor"},
                        "hashes": {"SHA256": hashlib.sha256(f"synthetic {i}".encode()).hexdigest().upper()},
                        "downloadUrl": f"https://example.invalid/download/{i}",
                        "primary": True,
                    }
                ],
                "images": [
                    {
                        "id": 30_000_000 + 2 * i + j,
                        "url": f"https://example.invalid/{i}/{j}.jpeg",
                        "nsfw": "None",
                        "width": 512,
                        "height": 768,
                        "meta": {"prompt": p, "steps": 20},
                    }
                    for j, p in enumerate(prompts)
                ],
            }
        ],
    }


class ClusteredEmbedder:
    """Text → unit vector near the centre of the text's topic cluster (synthetic, deterministic)."""

    supports_images = False

    def __init__(self, clusters: int, dim: int = 384, spread: float = 0.35, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.centres = rng.normal(size=(clusters, dim)).astype(np.float32) / np.sqrt(dim)
        self.lookup = {topic(c): c for c in range(clusters)}
        self.dim, self.spread = dim, spread
        self.name = f"synthetic-clustered-{clusters}-{dim}"

    def _cluster(self, text: str) -> int | None:
        low = text.lower()
        style = next((s for s in STYLES if s in low), None)
        subject = next((s for s in SUBJECTS if s in low), None)
        return self.lookup.get((style, subject)) if style and subject else None

    def embed_texts(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """Cluster centre + spread · hashed noise, L2-normalised."""
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            noise = np.random.default_rng(seed).normal(size=self.dim).astype(np.float32) / np.sqrt(self.dim)
            c = self._cluster(text)
            out[i] = noise if c is None else self.centres[c] + self.spread * noise
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed_images(self, images: Sequence[Any], *, show_progress: bool = False) -> np.ndarray:
        """Text only."""
        raise NotImplementedError("text only")


def records(n: int, clusters: int, seed: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """``n`` synthetic records."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield f"synthetic {i}", record(i, clusters, rng)


def queries(n: int, clusters: int, seed: int) -> list[str]:
    """Prompts in the catalog's style (a topic and quality words)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        style, subject = topic(int(rng.integers(0, clusters)))
        out.append(
            ", ".join([*rng.choice(QUALITY, 2), f"a {subject} in {style} style", str(rng.choice(SUBJECTS))])
        )
    return out


def _all_vectors(index: Any) -> np.ndarray:
    """The raw vectors of a FAISS index (flat or HNSW-flat storage)."""
    import faiss

    inner = index.index
    if isinstance(inner, faiss.IndexHNSWFlat):
        inner = faiss.downcast_index(inner.storage)
    return faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d).copy()


def _dense_report(approx: Any, exact: Any, vectors: np.ndarray) -> dict[str, Any]:
    from adapters_db.vector_index import recall_at_k

    cpu, wall = [], []
    for v in vectors:
        t0, c0 = time.perf_counter(), time.process_time()
        approx.search(v[None, :], 10)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    exact_cpu = []
    for v in vectors[:50]:
        c0 = time.process_time()
        exact.search(v[None, :], 10)
        exact_cpu.append((time.process_time() - c0) * 1000)
    return {
        "kind": approx.kind,
        "size": approx.size,
        "recall_at_10": round(recall_at_k(approx, exact, vectors, 10), 4),
        "p50_ms": round(statistics.median(wall), 3),
        "cpu_p50_ms": round(statistics.median(cpu), 3),
        "exact_cpu_p50_ms": round(statistics.median(exact_cpu), 3),
    }


def _build(args: argparse.Namespace, embedder: ClusteredEmbedder, report: dict[str, Any]) -> Any:
    import adapters_db

    directory = args.dir / f"n{args.adapters}"
    if directory.exists() and not args.keep:
        shutil.rmtree(directory)
    catalog = adapters_db.open_catalog(None, directory, embedder=embedder)
    progress = not args.json
    with catalog.session() as s:
        have = adapters_db.list_adapters(s, catalog, limit=1).total
    if have < args.adapters:
        t0, c0 = time.perf_counter(), time.process_time()
        with catalog.session() as s:
            summary = adapters_db.import_civitai_records(
                s,
                catalog,
                records(args.adapters, args.clusters, 0),
                show_progress=progress,
                total=args.adapters,
            )
        report["import_s"] = round(time.perf_counter() - t0, 1)
        report["import_cpu_s"] = round(time.process_time() - c0, 1)
        report["import_summary"] = summary.describe()
    t0 = time.perf_counter()
    adapters_db.embed_missing(catalog, show_progress=progress)
    report["embed_s"] = round(time.perf_counter() - t0, 1)
    t0, c0 = time.perf_counter(), time.process_time()
    with catalog.session() as s:
        index = catalog.search_index(s, show_progress=progress)
    report["index_build_s"] = round(time.perf_counter() - t0, 1)
    report["index_build_cpu_s"] = round(time.process_time() - c0, 1)
    report["index"] = {
        "adapters": index.size,
        "prompts": len(index.prompt_image_ids),
        "kinds": {k: v.kind for k, v in index.dense.items()},
        "vectors": {k: v.size for k, v in index.dense.items()},
    }
    return catalog, index


def _pruning_report(session: Any, catalog: Any, texts: list[str]) -> dict[str, Any]:
    """Candidate-first scoring (``adapters_db.pruning``) against exhaustive scoring of every adapter:
    recall@10 of the hybrid ranking, universe size and CPU time per query of each."""
    from adapters_db.retrieval import SearchOptions, feature_builder, prepare, score_all

    def top10(scores: np.ndarray) -> set[int]:
        return set(np.argsort(-scores, kind="stable")[:10].tolist())

    cpu: dict[bool, list[float]] = {True: [], False: []}
    recalls, sizes = [], []
    for text in texts:
        tops = {}
        for prune in (True, False):
            c0 = time.process_time()
            _, _, _, scores = score_all(session, catalog, text, SearchOptions(prune=prune))
            cpu[prune].append((time.process_time() - c0) * 1000)
            tops[prune] = top10(scores)
        recalls.append(len(tops[True] & tops[False]) / 10)
        index, ctx = prepare(session, catalog, text, SearchOptions())
        sizes.append(len(feature_builder(index).universe(ctx, None, SearchOptions().prune_config)))
    return {
        "queries": len(texts),
        "recall_at_10_vs_exhaustive": round(float(np.mean(recalls)), 4),
        "universe_p50": int(statistics.median(sizes)),
        "score_cpu_p50_ms": round(statistics.median(cpu[True]), 2),
        "exhaustive_score_cpu_p50_ms": round(statistics.median(cpu[False]), 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=500)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=ROOT / "runs" / "catalog_scale")
    parser.add_argument("--keep", action="store_true", help="reuse an existing catalog in --dir")
    parser.add_argument("--recall-queries", type=int, default=100, help="queries for candidate-first recall")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    import adapters_db
    from adapters_db.pruning import PRUNE_FROM
    from adapters_db.vector_index import VectorIndex

    embedder = ClusteredEmbedder(args.clusters)
    report: dict[str, Any] = {"adapters": args.adapters, "clusters": args.clusters, "embedder": embedder.name}
    catalog, index = _build(args, embedder, report)
    texts = queries(args.queries, args.clusters, 1)
    vectors = embedder.embed_texts(texts)
    for channel, approx in index.dense.items():
        exact = VectorIndex.build(_all_vectors(approx), approx.ids, kind="flat")
        report[f"dense_{channel}"] = _dense_report(approx, exact, vectors)
    cpu, wall = [], []
    with catalog.session() as s:
        adapters_db.search(s, catalog, texts[0], k=10)
        for text in texts:
            t0, c0 = time.perf_counter(), time.process_time()
            adapters_db.search(s, catalog, text, k=10)
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
    report["hybrid_search"] = {
        "p50_ms": round(statistics.median(wall), 2),
        "p95_ms": round(float(np.percentile(wall, 95)), 2),
        "cpu_p50_ms": round(statistics.median(cpu), 2),
        "cpu_p95_ms": round(float(np.percentile(cpu, 95)), 2),
        "candidate_first": index.size >= PRUNE_FROM,
    }
    with catalog.session() as s:
        report["candidate_first"] = _pruning_report(s, catalog, texts[: args.recall_queries])
    report["targets"] = {"dense_p50_ms": 10.0, "recall_at_10": 0.95}
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    if not args.json:
        first = report["candidate_first"]
        exact_ms, pruned_ms = first["exhaustive_score_cpu_p50_ms"], first["score_cpu_p50_ms"]
        head = f"{args.adapters:,} adapters, {first['queries']} queries"
        print(f"\n| {head} | exhaustive | candidate-first | ratio |")
        print("|---|---|---|---|")
        print(f"| scoring CPU p50 | {exact_ms} ms | {pruned_ms} ms | {pruned_ms / exact_ms:.2f} |")
        print(f"| exhaustive top 10 found | 1 | {first['recall_at_10_vs_exhaustive']} | |")
        size = first["universe_p50"]
        print(f"| rows featurised, p50 | {args.adapters:,} | {size:,} | {size / args.adapters:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
