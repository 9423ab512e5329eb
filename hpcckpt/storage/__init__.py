"""Storage: safetensors headers, positioned I/O, atomic commit, manifests, inputs."""
