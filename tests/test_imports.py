"""The inference path stays light: no training stack, no server stack, no ONNX tooling on import."""

import subprocess
import sys

import pytest

HEAVY = ("lightning", "lightning_fabric", "torchmetrics", "fastapi", "uvicorn", "onnx", "matplotlib", "timm", "yaml")


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout.split()
    return {m.split(".")[0] for m in out}


@pytest.mark.parametrize("code", [
    "import ferkit",
    "from ferkit import Recognizer",
    "import ferkit.cli",
])
def test_light_imports(code: str) -> None:
    heavy = _loaded_after(code) & set(HEAVY)
    assert not heavy, f"{code!r} imported {sorted(heavy)}"


def test_import_ferkit_does_not_import_torch() -> None:
    assert "torch" not in _loaded_after("import ferkit; ferkit.__version__")


def test_lazy_attribute_and_dir() -> None:
    import ferkit

    assert "Recognizer" in dir(ferkit)
    with pytest.raises(AttributeError):
        ferkit.does_not_exist  # noqa: B018
