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


def test_reading_model_metadata_does_not_import_torch(tmp_path) -> None:
    import torch  # noqa: F401  (only to write the file in this process)

    from ferkit.modelfile import ModelMeta, save_model
    from ferkit.models import create_model

    path = save_model(tmp_path / "m.safetensors", create_model("fastcnn", num_classes=3),
                      ModelMeta(arch="fastcnn", classes=("happy", "sad", "neutral")))
    mods = _loaded_after(f"from ferkit.modelfile import read_meta\nassert read_meta({str(path)!r}).arch == 'fastcnn'")
    assert "torch" not in mods


def test_predicting_with_a_bundled_model_does_not_import_torch() -> None:
    """The bundled models run from their ONNX siblings: `ferkit predict` on a real photo never loads torch."""
    from pathlib import Path

    photo = next((Path(__file__).resolve().parents[2] / "shared" / "data" / "wild-dev" / "happy").glob("*.jpg"), None)
    if photo is None:
        pytest.skip("wild-dev photos not found")
    code = (f"from ferkit.cli import main\nassert main(['predict', {str(photo)!r}, '--format', 'json']) == 0\n"
            "from ferkit import Recognizer\nassert Recognizer('fer7').backend == 'onnx'")
    mods = _loaded_after(code)
    assert "torch" not in mods and not mods & set(HEAVY)
