"""vlm-gpu-optimizer: a closed-loop GPU memory optimizer that publishes safe batch sizes to VLM services."""

__version__ = "0.1.0"
