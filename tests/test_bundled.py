"""The models shipped in the package: they load offline without pickle and recognise real faces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ferkit import Recognizer
from ferkit.cli import main
from ferkit.modelfile import bundled_models, read_meta
from shared_data import FER_DIR, VALIDATION, WILD, needs_fer


def test_bundled_models_present_small_and_described() -> None:
    models = bundled_models()
    assert {"fer3", "fer7", "fer3-large", "fer7-large"} <= set(models)
    for name, path in models.items():
        assert path.stat().st_size <= 20 * 1024 * 1024
        meta = read_meta(path)
        assert meta.name == name
        assert 0 < meta.metrics["accuracy"] <= 1
        card = (path.parent / f"{name}.md").read_text()
        assert card.count("validation") >= 1
        # the card is generated from the metadata (scripts/bundle_model.py): calibration, min_score, terms
        cal = meta.metrics["calibration"]
        assert meta.temperature == cal["temperature"] and cal["fit_split"] == "validation"
        assert f"ECE **{cal['after_cross_fit']['ece']:.4f}**" in card and "commercial" in card
        assert f"suggested `min_score` | **{meta.metrics['suggested_min_score']:g}**" in card
    for name in ("fer3", "fer3-large"):
        assert read_meta(models[name]).classes == ("happy", "sad", "neutral")
    for name in ("fer7", "fer7-large"):
        assert len(read_meta(models[name]).classes) == 7
    for name in ("fer3", "fer7", "fer3-large", "fer7-large"):  # ferkit models shows the tier and faces/s
        m = read_meta(models[name]).metrics
        assert m["tier"] == ("large" if name.endswith("-large") else "fast") and m["faces_per_second"] > 0


def test_models_card_prints_the_card(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--card", "fer7"]) == 0
    assert capsys.readouterr().out == (bundled_models()["fer7"].with_suffix(".md")).read_text()
    assert main(["models", "--card", "fer9"]) == 2
    assert "did you mean 'fer" in capsys.readouterr().err


def test_models_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fer3"]["classes"] == ["happy", "sad", "neutral"] and rows["fer3"]["input_size"] == 48
    assert rows["fer7"]["validation_accuracy"] > 0.5


@needs_fer
# Floors of what ships (issue 9's goals: fer3 83% / fer3-large 85% are not reached yet, fer7 69% and fer7-large 72%
# are: benchmarks/README.md has every run); the large models carry their TTA views, so classify applies them.
@pytest.mark.parametrize("name,floor", [("fer3", 0.81), ("fer7", 0.69), ("fer3-large", 0.82), ("fer7-large", 0.72)])
def test_bundled_accuracy_on_validation(name: str, floor: float) -> None:
    """Accuracy floors on the whole validation split, through the product path (Recognizer.classify)."""
    from ferkit.classes import match_folder
    from ferkit.images import load_image

    rec = Recognizer(model=name)
    folders = {match_folder(d.name, rec.classes): d for d in VALIDATION.iterdir() if d.is_dir()}
    crops, truth = [], []
    for i, c in enumerate(rec.classes):
        files = sorted(folders[c].glob("*.jpg"))
        crops += [load_image(f) for f in files]  # FER2013 files are 48×48 grayscale
        truth += [i] * len(files)
    pred = rec.classify(np.stack(crops)).argmax(1)
    acc = float((pred == np.array(truth)).mean())
    assert acc >= floor, f"{name}: {acc:.4f} on validation (n={len(truth)}), floor {floor}"
    stored = read_meta(bundled_models()[name]).metrics
    assert stored["n"] == len(truth) and abs(acc - stored["accuracy"]) < 2e-3, (acc, stored)  # its card is true


@needs_fer
def test_fer3_end_to_end_on_wild_photos() -> None:
    rec = Recognizer()  # the default: fer3, yunet
    ok = n = 0
    for c in ("happy", "sad", "neutral"):
        for f in sorted((WILD / c).glob("*.jpg"))[:25]:
            faces = rec.predict(str(f))
            assert faces.faces, f"no face in {f}"
            ok += faces.faces[0].label == c
            n += 1
    assert ok / n >= 0.75, f"{ok}/{n} wild-dev photos right"


@needs_fer
def test_refresh_speed_rewrites_the_stored_speed_everywhere(tmp_path: Path) -> None:
    """bundle_model.py --refresh-speed on a copy of fer3: the file's faces/s, its card JSON and card row take the new
    measurement, the weights stay bit-identical and the ONNX sibling is rewritten for the new file's digest."""
    import shutil
    import subprocess
    import sys

    from safetensors.numpy import load_file

    from ferkit.modelfile import SOURCE_DIGEST_KEY, file_digest, onnx_sibling

    repo = Path(__file__).resolve().parents[1]
    src = bundled_models()["fer3"]
    to, cards = tmp_path / "weights", tmp_path / "cards"
    to.mkdir()
    cards.mkdir()
    for suffix in (".safetensors", ".onnx", ".md"):
        shutil.copy(src.with_suffix(suffix), to / f"fer3{suffix}")
    shutil.copy(repo / "benchmarks" / "cards" / "fer3.json", cards / "fer3.json")
    card = json.loads((cards / "fer3.json").read_text())
    card["faces_per_second"] = 1.0  # a stale figure to be replaced
    (cards / "fer3.json").write_text(json.dumps(card))
    subprocess.run([sys.executable, str(repo / "scripts" / "bundle_model.py"), "fer3", "fer3", "--refresh-speed",
                    "--to", str(to), "--cards", str(cards), "--data", str(FER_DIR)], check=True,
                   capture_output=True, text=True)
    new = to / "fer3.safetensors"
    fps = json.loads((cards / "fer3.json").read_text())["faces_per_second"]
    assert fps > 100 and read_meta(new).metrics["faces_per_second"] == round(fps)
    assert read_meta(new).metrics["accuracy"] == read_meta(src).metrics["accuracy"]
    a, b = load_file(str(src)), load_file(str(new))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert f"{fps:,.0f} faces/s measured again after bundling" in (to / "fer3.md").read_text()
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_sibling(new))).metadata_props}
    assert props[SOURCE_DIGEST_KEY] == file_digest(new) != file_digest(src)
