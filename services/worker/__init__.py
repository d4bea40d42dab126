"""The self-hosted worker: a fal-protocol HTTP server running SDXL inpainting (or a CPU fallback)."""
