"""Learned gated fusion (AutoLoRA, arXiv 2508.02107) with timestep and prompt inputs."""
