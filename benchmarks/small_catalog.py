"""Retrieval on small catalogs: LoRAs sampled from the Civitai dump, as a user's own collection.

The fusion models are fitted on the whole 7,955-LoRA catalog; a user's catalog holds tens or hundreds
of LoRAs, often local files with no preview prompts. This samples ``--size`` LoRAs that have
(prompt → LoRA) pairs, imports them (``--no-pictures``: without their preview pictures, so without
prompts), and ranks up to ``--queries`` of their pairs (the query's own picture left out), with the
prompt as given and with the gold LoRA's trained words removed. The reference, measured in the same
run on the same catalog, is TF-IDF cosine over metadata (``tf_meta``), and with pictures also over
metadata + other pictures' prompts (``tf_doc``). Lexical channels only (the hashing embedder: no
model download), no classifier or matcher: what a fresh local catalog has.

    python benchmarks/small_catalog.py --size 200 --no-pictures
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
CATALOG_FILE = DATA / "civitai_lora_sfw_2023-07.jsonl.gz"
BENCH_FILE = DATA / "bench_prompt_to_lora_dev.jsonl.gz"
CHANNELS = ("prompts", "meta", "triggers", "fts")


def sample_catalog(size: int, seed: int, pictures: bool) -> tuple[list[dict], list[dict]]:
    """``size`` Civitai records that have bench pairs (pictures dropped unless ``pictures``) and their
    pairs, shuffled."""
    rng = random.Random(seed)
    with gzip.open(BENCH_FILE, "rt", encoding="utf-8") as fh:
        pairs = [json.loads(line) for line in fh]
    chosen = set(rng.sample(sorted({p["model_id"] for p in pairs}), size))
    with gzip.open(CATALOG_FILE, "rt", encoding="utf-8") as fh:
        records = [r for r in map(json.loads, fh) if r["id"] in chosen]
    if not pictures:
        for record in records:
            for version in record.get("modelVersions", []):
                version["images"] = []
    mine = [p for p in pairs if p["model_id"] in chosen]
    rng.shuffle(mine)
    return records, mine


def ranks_of(scores: np.ndarray, row: int) -> int:
    """1 + the number of rows scored strictly above ``row``; a row scored like ``row`` counts as above
    (a reference channel that gives every adapter 0 must not rank the gold first)."""
    return int((scores > scores[row]).sum() + (scores == scores[row]).sum())


def run(size: int, seed: int, pictures: bool, n_queries: int) -> dict[str, dict[str, dict[str, float]]]:
    """Recall@1/5/10 and MRR of the fusion and the TF-IDF references, per prompt variant."""
    from sqlalchemy import select

    import adapters_db
    from adapters_db import HashingEmbedder
    from adapters_db.models import Adapter, PreviewImage, TriggerWord
    from adapters_db.retrieval import SearchOptions, score_all
    from adapters_db.text import remove_phrases
    from benchmarks.retrieval import metrics

    records, pairs = sample_catalog(size, seed, pictures)
    with tempfile.TemporaryDirectory() as tmp:
        catalog = adapters_db.open_catalog(None, Path(tmp), embedder=HashingEmbedder(64))
        with catalog.session() as s:
            adapters_db.import_civitai_records(s, catalog, ((str(r["id"]), r) for r in records))
        with catalog.session() as s:
            ids = {int(c): int(a) for a, c in s.execute(select(Adapter.id, Adapter.civitai_model_id))}
            images = dict(
                s.execute(
                    select(PreviewImage.civitai_image_id, PreviewImage.id).where(
                        PreviewImage.civitai_image_id.is_not(None)
                    )
                ).all()
            )
            triggers: dict[int, list[str]] = {}
            for a, w in s.execute(select(TriggerWord.adapter_id, TriggerWord.word)):
                triggers.setdefault(int(a), []).append(w)
            channels = ("fusion", "tf_meta", *(("tf_doc",) if pictures else ()))
            ranks: dict[str, dict[str, list[int]]] = {
                c: {"with_triggers": [], "without_triggers": []} for c in channels
            }
            for pair in pairs[:n_queries]:
                adapter = ids[pair["model_id"]]
                own = images.get(pair["image_id"])
                options = SearchOptions(channels=CHANNELS, exclude_image_ids=(own,) if own else ())
                for variant, text in (
                    ("with_triggers", pair["prompt_clean"]),
                    ("without_triggers", remove_phrases(pair["prompt_clean"], triggers.get(adapter, []))),
                ):
                    if not text.strip():
                        continue
                    index, _, feats, scores = score_all(s, catalog, text, options)
                    row = int(index.rows_of(np.array([adapter]))[0])
                    ranks["fusion"][variant].append(ranks_of(scores, row))
                    for name in channels[1:]:
                        ranks[name][variant].append(ranks_of(feats[name].astype(np.float64), row))
        catalog.dispose()
    return {c: {v: metrics(r) for v, r in by.items()} for c, by in ranks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=200, help="LoRAs in the sampled catalog")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=400, help="at most this many pairs")
    parser.add_argument("--no-pictures", action="store_true", help="import the records without pictures")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not BENCH_FILE.is_file():
        sys.exit(f"{BENCH_FILE} is not there (../shared/data)")
    result = run(args.size, args.seed, not args.no_pictures, args.queries)
    if args.json:
        print(json.dumps(result))
        return
    ref = result["tf_meta"]
    print(f"{args.size} LoRAs, {'no pictures' if args.no_pictures else 'with pictures'}, seed {args.seed}")
    print("| channel | prompt | R@1 | R@10 | MRR | R@1 / tf_meta |")
    print("|---|---|---|---|---|---|")
    for channel, by in result.items():
        for variant, m in by.items():
            ratio = m["R@1"] / ref[variant]["R@1"] if ref[variant]["R@1"] else float("nan")
            print(
                f"| {channel} | {variant} | {m['R@1']:.3f} | {m['R@10']:.3f} | {m['MRR']:.3f} | {ratio:.2f} |"
            )


if __name__ == "__main__":
    main()
