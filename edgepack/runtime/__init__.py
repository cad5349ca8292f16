"""edgepack's runtime: what ships inside every bundle and image.

Imports only the standard library, numpy and onnxruntime, so a device needs nothing else; a bundle
built with ``--arch`` carries those two as wheels and needs only python3 (see ``deps``). The HTTP
server (``server``, ``app``, ``v2``, ``models``, ``metrics``) adds the stack ``requirements.SERVE``
names, imported only when ``serve`` runs. Modules
import each other relatively: in a bundle this package is called ``runtime``, in the repository
``edgepack.runtime``.
"""

RUNTIME_API = 1

if __name__ == "runtime":
    # Only inside an unpacked bundle (this package is ``edgepack.runtime`` on the build side): the
    # package is imported before any of its modules, whichever entry point ran (./run, python -m
    # runtime, python -m runtime.bench), so this is the one place that can put the bundle's own
    # numpy and onnxruntime on sys.path before something imports them.
    from pathlib import Path as _Path

    from .deps import activate_or_exit as _activate_or_exit

    _activate_or_exit(_Path(__file__).resolve().parent.parent)
