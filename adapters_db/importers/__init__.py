"""Importers: local safetensors files and A1111/ComfyUI folders, Civitai dumps and API, Hugging Face repos,
and adapters made by the studio's trainer. Each is a plain function; the CLI wraps them."""
