"""SGLang's own code on a CPU machine, without its CUDA-only dependencies.

CI installs the sglang wheel with `pip install --no-deps` (its Python source, no CUDA libraries). Importing
`sglang` runs `sglang/__init__.py`, which pulls the frontend language API and ~15 packages the tests do not need,
so the tests reach SGLang's code in three ways, all reading the installed files:
  * `load_tensor_bucket()`: `srt/weight_sync/tensor_bucket.py` (imports torch only) loaded with
    `importlib.util.spec_from_file_location` under its real module name;
  * `light_sglang()`: a package object for `sglang` whose __path__ is the installed directory, so that
    `import sglang.srt.x.y` executes the real files of x.y (the `srt` tree has no heavy __init__) without running
    `sglang/__init__.py`; pickle needs it too, because it imports the top-level package of a class it (un)pickles;
  * `sglang_defs()`: named functions/classes copied out of a larger SGLang file with `ast` and executed with the
    few names they use (for files whose imports need CUDA-only packages), e.g. the serializer and the weight loader.
"""

from __future__ import annotations

import __future__
import ast
import contextlib
import importlib.util
import os
import sys
import types

SPEC = importlib.util.find_spec("sglang")
SKIP_REASON = "the sglang wheel is not installed (CI: pip install --no-deps sglang==0.5.23)"
TENSOR_BUCKET = "sglang.srt.weight_sync.tensor_bucket"


def sglang_dir() -> str:
    return os.path.dirname(SPEC.origin)


def sglang_file(relpath: str) -> str:
    return os.path.join(sglang_dir(), relpath)


def load_tensor_bucket():
    """SGLang's tensor_bucket module, loaded from its file (registered in sys.modules under its real name)."""
    if TENSOR_BUCKET in sys.modules:
        return sys.modules[TENSOR_BUCKET]
    spec = importlib.util.spec_from_file_location(TENSOR_BUCKET, sglang_file("srt/weight_sync/tensor_bucket.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[TENSOR_BUCKET] = module
    return module


@contextlib.contextmanager
def light_sglang():
    """While active: `sglang` is a bare package over the installed directory and tensor_bucket is loaded from its
    file; every sglang module imported meanwhile is dropped afterwards."""
    before = {name: module for name, module in sys.modules.items() if name == "sglang" or name.startswith("sglang.")}
    shell = types.ModuleType("sglang")
    shell.__path__ = [sglang_dir()]
    sys.modules["sglang"] = shell
    try:
        yield load_tensor_bucket()
    finally:
        for name in [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]:
            del sys.modules[name]
        sys.modules.update(before)


def class_fields(relpath: str, class_name: str | None = None) -> set[str]:
    """Annotated attribute names of a class in an SGLang file (every class of the file when class_name is None)."""
    tree = ast.parse(open(sglang_file(relpath)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and (class_name is None or node.name == class_name):
            names.update(s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target,
                                                                                                   ast.Name))
    return names


def method_params(relpath: str, class_name: str, method: str) -> list[str]:
    """Parameter names of a method, read from an SGLang file."""
    for node in ast.walk(ast.parse(open(sglang_file(relpath)).read())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    a = item.args
                    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    raise LookupError(f"{class_name}.{method} not found in {relpath}")


def sglang_defs(relpath: str, names: list[str], namespace: dict, class_name: str | None = None) -> dict:
    """Execute the top-level definitions `names` of an SGLang file (or the methods `names` of `class_name`, as plain
    functions taking `self`) in `namespace`, which supplies the globals they use; return the namespace."""
    tree = ast.parse(open(sglang_file(relpath)).read())
    scope = tree.body
    if class_name is not None:
        scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name).body

    def name_of(node):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return node.name
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            return node.targets[0].id
        return None

    body = [node for node in scope if name_of(node) in names]
    missing = set(names) - {name_of(node) for node in body}
    if missing:
        raise LookupError(f"{sorted(missing)} not found in {relpath} (SGLang changed: update the tests)")
    module = ast.Module(body=body, type_ignores=[])
    flags = __future__.annotations.compiler_flag  # the files use postponed annotations
    exec(compile(module, sglang_file(relpath), "exec", flags=flags, dont_inherit=True), namespace)
    return namespace


def sglang_serializer() -> dict:
    """SGLang's MultiprocessingSerializer, SafeUnpickler and payload normalisation (srt/utils/common.py, whose
    imports need CUDA-only packages). `pybase64` is bound to the standard library's base64 (same b64encode /
    b64decode(validate=) API): it is used only for base64 text payloads, which these tests do not send."""
    import base64
    import binascii
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler
    from typing import List, Union

    import torch

    namespace = {"io": io, "pickle": pickle, "torch": torch, "binascii": binascii, "pybase64": base64,
                 "ForkingPickler": ForkingPickler, "List": List, "Union": Union}
    return sglang_defs("srt/utils/common.py", [
        "MultiprocessingSerializer", "SerializedTensorPayload", "_looks_like_pickle_payload",
        "normalize_serialized_named_tensor_payload", "normalize_serialized_named_tensor_payloads",
        "_safe_load_torch_storage", "SafeUnpickler"], namespace)
