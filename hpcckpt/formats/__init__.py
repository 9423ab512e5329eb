"""File formats, below planning and storage: safetensors headers and the checkpoint layout's names."""
