"""The one exception hierarchy and the shared failure classification of step5.errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from step5.errors import is_out_of_memory


class _LibraryError(Exception):
    """Stands in for a tree library's own error class."""


class _AllocatorError(RuntimeError):
    """Stands in for torch's OutOfMemoryError, which this torch-free test cannot import."""


@pytest.mark.parametrize(
    ("exc", "oom_types", "expected"),
    [
        (MemoryError(), (), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), (), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: not enough memory"), (), True),
        (RuntimeError("can't allocate memory: you tried to allocate 8 bytes"), (), True),
        (_LibraryError("Out of memory in GPU histogram"), (), True),
        (_AllocatorError("allocation failed"), (_AllocatorError,), True),
        (_AllocatorError("allocation failed"), (), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), (), False),
        (ValueError("learning_rate must be positive"), (), False),
    ],
)
def test_is_out_of_memory(exc, oom_types, expected):
    assert is_out_of_memory(exc, oom_types) is expected


def _exception_classes_outside_errors_py() -> list[str]:
    """Public exception classes defined in step5 anywhere but errors.py (step5/testing,
    test tooling, excepted): a class deriving from a name that ends in Error, Exception,
    Interrupt or another such class."""
    import ast
    package = Path(__file__).resolve().parents[1] / "step5"
    found = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "errors.py" or "testing" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]
            if any(b.endswith(("Error", "Exception", "Interrupt", "Closed", "Crashed", "Fault")) for b in bases):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.name}")
    return found


def test_every_public_exception_is_defined_in_errors_py():
    assert _exception_classes_outside_errors_py() == []


def test_every_exception_in_errors_py_is_documented_in_its_table():
    import step5.errors as errors

    classes = [name for name, obj in vars(errors).items()
               if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == errors.__name__]
    table = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()  # the table errors.py points at
    assert classes and all(f"| `{name}` |" in table for name in classes)
    assert all(getattr(errors, name).__doc__ for name in classes)
    assert all(issubclass(getattr(errors, name), (errors.Step5Error, KeyboardInterrupt)) for name in classes)


def test_an_error_reply_of_an_unknown_type_is_not_rebuilt_as_a_train_error():
    # It was, so a trainer answering in words the parent does not know failed the trial as if the
    # model could not train; such a reply is a protocol fault (step5.execution.process.reply_problem).
    from step5.errors import JobError

    with pytest.raises(ValueError, match="gpu_melted"):
        JobError.from_dict({"status": "error", "error": "the GPU melted", "error_type": "gpu_melted"})
    assert JobError.from_dict({"status": "error", "error": "x", "error_type": "data_error"}).error_type == "data_error"
