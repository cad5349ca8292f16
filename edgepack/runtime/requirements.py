"""What the runtime needs from PyPI, by role: the one list that images, bundles and CI read.

Standard library only, so the build side can read it without importing the server.
"""

from __future__ import annotations

# Inference and the benchmark: every bundle and image.
CORE = ("numpy", "onnxruntime")
# The HTTP server (`edgepack serve`, cloud images): uvicorn with its C-accelerated parser and event
# loop, and orjson for JSON bodies; the app itself is a small ASGI callable (no framework).
SERVE = ("uvicorn>=0.30", "httptools>=0.6", "uvloop>=0.19", "orjson>=3.10")
