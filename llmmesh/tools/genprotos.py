"""Generate Python stubs (with .pyi) for every proto under protos/ into `llmmesh/generated/`.

`protos/llmmesh/<api>/v1/x.proto` becomes the module `llmmesh.generated.<api>.v1.x_pb2` (protoc
maps the virtual path `llmmesh/generated` onto `protos/llmmesh`). Everything under
`llmmesh/generated/` is generated API code, ignored by git: protos/ is the single source of truth,
and `make lint` fails if a generated file is ever tracked.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
SOURCE = PROTOS / "llmmesh"
GENERATED = "llmmesh/generated"
BIN = Path(sys.executable).parent


def main() -> int:
    files = sorted(SOURCE.rglob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{GENERATED}={SOURCE}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={ROOT}",
        f"--mypy_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        *(str(f) for f in files),
    ]
    rc = protoc.main(args)
    if rc != 0:
        return int(rc)
    # Package markers for every generated directory (llmmesh/generated/<api>/ and .../v1/).
    for f in files:
        rel = Path(GENERATED) / f.relative_to(SOURCE).parent
        for depth in range(1, len(rel.parts) + 1):
            init = ROOT.joinpath(*rel.parts[:depth]) / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated from protos/."""\n')
    (ROOT / "llmmesh" / "py.typed").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
