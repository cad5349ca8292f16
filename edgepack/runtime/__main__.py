"""Bundle launcher: ``python -m runtime verify|bench|predict|serve`` from an unpacked bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import EdgepackError, ExitCode, InputError


def _root() -> Path:
    return Path(__file__).resolve().parent.parent


def _predict(argv: list[str]) -> int:
    import numpy as np

    from .bundle import verify_dir
    from .session import create_session

    if len(argv) != 1:
        raise InputError("usage: predict INPUT.npy|INPUT.npz", "give one file of input rows")
    root = _root()
    manifest = verify_dir(root).manifest
    path = Path(argv[0])
    if not path.is_file():
        raise InputError(f"{path}: no such input file", "check the path")
    session, _ = create_session(root / manifest["model"])
    names = [i.name for i in session.get_inputs()]
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            feed = {name: archive[name] for name in names}
    else:
        feed = {names[0]: np.load(path, allow_pickle=False)}
    outputs = session.run(None, feed)
    print(json.dumps({o.name: v.tolist() for o, v in zip(session.get_outputs(), outputs)}))
    return 0


def main(argv: list[str]) -> int:
    from .bundle import verify_dir

    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if command == "verify":
            verified = verify_dir(_root())
            print(f"ok: {verified.manifest['name']} {verified.manifest['version']}, "
                  f"{len(verified.sums)} files verified")
            return 0
        if command == "bench":
            from . import bench

            return bench.main(rest)
        if command == "predict":
            return _predict(rest)
        if command == "serve":
            from .server import main as serve

            return serve(rest, _root())
    except EdgepackError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return int(err.exit_code)
    print("usage: python -m runtime verify | bench [--help] | predict INPUT.npy | serve [--help]", file=sys.stderr)
    return int(ExitCode.USAGE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
