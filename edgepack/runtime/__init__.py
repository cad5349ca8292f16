"""edgepack's runtime: what ships inside every bundle and image.

Imports only the standard library, numpy and onnxruntime, so a device needs nothing else. Modules
import each other relatively: in a bundle this package is called ``runtime``, in the repository
``edgepack.runtime``.
"""

RUNTIME_API = 1
