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
    #
    # It is also the first code of the bundle that runs, so from here on the bundle's own modules are
    # compiled from their checksummed sources only: no cached bytecode (__pycache__, .pyc) and no
    # compiled extension beside them is ever imported, and none is written (verify refuses one).
    import os as _os
    import sys as _sys
    from importlib.machinery import FileFinder as _FileFinder
    from importlib.machinery import SourceFileLoader as _SourceFileLoader
    from pathlib import Path as _Path

    class _SourceOnlyLoader(_SourceFileLoader):
        def get_code(self, fullname: str):  # never reads nor writes bytecode
            return self.source_to_code(self.get_data(self.path), self.path)

    _sys.path_importer_cache[__path__[0]] = _FileFinder(__path__[0], (_SourceOnlyLoader, [".py"]))
    # Only this file was compiled the usual way; python -m runtime (without -B, unlike ./run) may
    # just have cached it. That cache comes from the source now running, so removing it loses nothing.
    if __spec__ is not None and __spec__.cached and \
            _os.path.dirname(__spec__.cached) == _os.path.join(__path__[0], "__pycache__"):
        try:
            _os.unlink(__spec__.cached)
            _os.rmdir(_os.path.dirname(__spec__.cached))
        except OSError:
            pass

    from .deps import activate_or_exit as _activate_or_exit

    _activate_or_exit(_Path(__file__).resolve().parent.parent)
