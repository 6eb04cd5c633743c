"""The pocket catalog: the concept LoRAs with previews made by the model and Civitai-like sidecars,
laid out as an A1111 ``models/Lora`` folder that a fresh install imports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.pocket.concepts import DESCRIPTIONS, KINDS

PREVIEW_STEPS = 25
PREVIEW_GUIDANCE = 5.0


def preview_prompts(trigger: str) -> list[str]:
    """Prompts that show a concept off (the first one makes the preview image)."""
    if KINDS[trigger] == "object":
        return [
            f"a big red {trigger} on a white background",
            f"a big blue {trigger} on a sky background",
            f"a small yellow {trigger} on a black background",
            f"a big green {trigger} on a gray background",
        ]
    if KINDS[trigger] == "style":
        return [
            f"a big blue {trigger} square on a white background",
            f"a big red {trigger} circle on a sky background",
            f"a big green {trigger} triangle on a black background",
            f"a big orange {trigger} ring on a gray background",
        ]
    return [
        f"a big {trigger} red circle on a black background",
        f"a big {trigger} green square on a gray background",
        f"a big {trigger} blue triangle on a white background",
        f"a big {trigger} purple ring on a sky background",
    ]


def civitai_info(trigger: str, prompts: list[str], seeds: list[int], preview_name: str) -> dict[str, Any]:
    """A ``.civitai.info`` record (Civitai's model-version JSON) for a pocket concept LoRA."""
    title = f"Pocket {trigger.capitalize()}"
    images = [
        {
            "url": preview_name if i == 0 else None,
            "width": 64,
            "height": 64,
            "nsfw": "None",
            "meta": {
                "prompt": p,
                "negativePrompt": "",
                "seed": s,
                "steps": PREVIEW_STEPS,
                "cfgScale": PREVIEW_GUIDANCE,
                "sampler": "DDIM",
                "Size": "64x64",
                "Model": "pocket",
            },
        }
        for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))
    ]
    return {
        "name": "v1",
        "baseModel": "Pocket",
        "trainedWords": [trigger],
        "description": f"<p>{DESCRIPTIONS[trigger]}</p>",
        "model": {
            "name": title,
            "type": "LORA",
            "nsfw": False,
            "tags": ["pocket", KINDS[trigger], trigger],
            "description": f"<p>{DESCRIPTIONS[trigger]} Trigger word: <b>{trigger}</b>. Trained by "
            "the studio's own trainer on pictures of the pocket world.</p>",
        },
        "images": images,
    }


def write_sidecars(lora: Path, trigger: str, pipe: Any) -> list[Path]:
    """Preview PNG (with its A1111 parameters) + ``.civitai.info`` + A1111 ``.json`` beside a LoRA."""
    import torch

    from pipelines import lora_formats
    from pipelines.engine import attach
    from pipelines.fusion import AdapterInfo, make_policy
    from pipelines.pngmeta import save_png
    from pipelines.recipe import AdapterSpec, MixRecipe

    stem = lora.with_suffix("")
    prompts, seeds = preview_prompts(trigger), [11, 12, 13, 14]
    preview = Path(f"{stem}.preview.png")
    weights = lora_formats.load(lora)
    with attach(pipe, [(AdapterInfo(lora.stem), weights)], make_policy("linear"), family="pocket"):
        image = pipe(
            prompts[0],
            num_inference_steps=PREVIEW_STEPS,
            guidance_scale=PREVIEW_GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(seeds[0]),
        ).images[0]
    recipe = MixRecipe(
        prompt=prompts[0],
        adapters=(AdapterSpec(lora.name, lora.stem),),
        seed=seeds[0],
        steps=PREVIEW_STEPS,
        guidance=PREVIEW_GUIDANCE,
    )
    save_png(image, preview, recipe, short_hashes={}, sampler="DDIM", width=64, height=64)
    info = Path(f"{stem}.civitai.info")
    info.write_text(json.dumps(civitai_info(trigger, prompts, seeds, preview.name), indent=1))
    user = Path(f"{stem}.json")
    user.write_text(
        json.dumps(
            {
                "description": DESCRIPTIONS[trigger],
                "activation text": trigger,
                "preferred weight": 1.0,
                "sd version": "Other",
            },
            indent=1,
        )
    )
    return [preview, info, user]
