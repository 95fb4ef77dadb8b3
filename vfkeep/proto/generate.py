"""Regenerate the committed *_pb2.py modules from the .proto files here.

The generated modules are committed so a plain install needs only the
`protobuf` runtime; `make proto` (needs grpcio-tools from the test extras)
rewrites them, and a test checks they are current.
"""
import pathlib
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent


def generate(out_dir: pathlib.Path = HERE) -> None:
    protos = sorted(p.name for p in HERE.glob("*.proto"))
    args = ["protoc", f"-I{HERE}", f"--python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc emits absolute imports (`import guid_pb2`); make them package-relative.
    for path in out_dir.glob("*_pb2.py"):
        text = path.read_text()
        for p in protos:
            mod = p.removesuffix(".proto") + "_pb2"
            text = text.replace(f"\nimport {mod} as ", f"\nfrom . import {mod} as ")
        path.write_text(text)


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
