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
    assert {"fer3", "fer7", "fer8", "fer3-large", "fer7-large"} <= set(models)
    for name, path in models.items():
        assert path.stat().st_size <= 20 * 1024 * 1024
        meta = read_meta(path)
        assert meta.name == name
        assert 0 < meta.metrics["accuracy"] <= 1
        card = (path.parent / f"{name}.md").read_text()
        assert card.count("validation") >= 1
        # the card is generated from the metadata (scripts/bundle_model.py): calibration, min_score, terms
        cal = meta.metrics["calibration"]
        assert meta.temperature == cal["temperature"] and cal["fit_split"].startswith("validation")
        assert f"ECE **{cal['after_cross_fit']['ece']:.4f}**" in card and "commercial" in card
        assert f"suggested `min_score` | **{meta.metrics['suggested_min_score']:g}**" in card
    for name in ("fer3", "fer3-large"):
        assert read_meta(models[name]).classes == ("happy", "sad", "neutral")
    for name in ("fer7", "fer7-large"):
        assert len(read_meta(models[name]).classes) == 7
    assert read_meta(models["fer8"]).classes[-1] == "contempt" and len(read_meta(models["fer8"]).classes) == 8
    for name in ("fer3", "fer7", "fer8", "fer3-large", "fer7-large"):  # ferkit models shows the tier and faces/s
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
    assert {r["validation_labels"] for r in rows.values()} == {"ferplus-majority"}  # every bundled one: people
    assert {n for n, r in rows.items() if r["int8_sibling"]} == {
        n for n, p in bundled_models().items() if p.with_suffix(".int8.onnx").is_file()} >= {"fer3"}


@needs_fer
# Floors of what ships, against people: the FER+ majority label of each validation face (issue 24's goals: fer7 84%,
# fer8 86% and fer7-large 87% are reached; fer3 92% and fer3-large 94% are not: benchmarks/README.md has every run).
# The large models carry their TTA views, so classify applies them.
@pytest.mark.parametrize("name,floor", [("fer3", 0.89), ("fer7", 0.865), ("fer8", 0.86), ("fer3-large", 0.895),
                                        ("fer7-large", 0.87)])
def test_bundled_accuracy_on_validation(name: str, floor: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """FER+ majority accuracy on the whole validation split through the product path (Recognizer.classify), and the
    folder-label accuracy beside it: both as the model's card and metadata state them. A model with an int8 sibling
    is held to the same floor through it, within 0.3 points of the float graph, as its card states."""
    from ferkit.classes import match_folder
    from ferkit.data.labels import majority_labels, read_votes
    from ferkit.images import load_image

    rec = Recognizer(model=name, backend="onnx")  # the float graph: what the card's numbers are for
    table = read_votes(FER_DIR / "ferplus" / "validation.csv")
    files = sorted(VALIDATION.glob("*/*.jpg"))
    votes = np.stack([table.by_path.get(f"validation/{f.parent.name}/{f.name}", np.full(10, np.nan)) for f in files])
    faces = np.stack([load_image(f) for f in files])  # FER2013 files are 48×48 grayscale
    pred = rec.classify(faces).argmax(1)
    truth = majority_labels(votes, list(rec.classes))
    kept = truth >= 0
    acc = float((pred[kept] == truth[kept]).mean())
    assert acc >= floor, f"{name}: {acc:.4f} against the FER+ majority (n={kept.sum()}), floor {floor}"
    stored = read_meta(bundled_models()[name]).metrics
    assert stored["labels"] == "ferplus-majority" and stored["n"] == kept.sum()
    assert abs(acc - stored["accuracy"]) < 2e-3, (acc, stored["accuracy"])  # its card is true
    int8 = json.loads((REPO / "benchmarks" / "cards" / f"{name}.json").read_text()).get("int8")
    assert bool(int8) == (bundled_models()[name].with_suffix(".int8.onnx").is_file())
    if int8:
        monkeypatch.setenv("FERKIT_INT8", "1")
        q = Recognizer(model=name)
        assert q.runtime.int8
        acc_q = float((q.classify(faces).argmax(1)[kept] == truth[kept]).mean())
        assert acc_q >= floor and acc - acc_q <= 0.003 + 1e-9
        assert abs(acc_q - int8["int8_accuracy"]) < 2e-3 and int8["labels"] == "FER+ majority"
    folder = np.array([rec.classes.index(c) if (c := match_folder(f.parent.name, rec.classes)) else -1 for f in files])
    acc_folder = float((pred[folder >= 0] == folder[folder >= 0]).mean())
    assert stored["n_folder"] == (folder >= 0).sum() and abs(acc_folder - stored["accuracy_folder"]) < 2e-3
    assert acc_folder < acc  # the folder labels disagree with people: the expected drop, stated on every card


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


REPO = Path(__file__).resolve().parents[1]


def copy_bundled(name: str, tmp_path: Path) -> tuple[Path, Path]:
    """A bundled model's file, ONNX sibling, card and card JSON copied to ``weights/`` and ``cards/`` under tmp_path."""
    import shutil

    src = bundled_models()[name]
    to, cards = tmp_path / "weights", tmp_path / "cards"
    to.mkdir()
    cards.mkdir()
    for suffix in (".safetensors", ".onnx", ".md"):
        shutil.copy(src.with_suffix(suffix), to / f"{name}{suffix}")
    shutil.copy(REPO / "benchmarks" / "cards" / f"{name}.json", cards / f"{name}.json")
    return to, cards


def bundle(*args: str | Path, data: Path = FER_DIR) -> str:
    """scripts/bundle_model.py run for real (on ``data``); its output."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bundle_model.py"), *map(str, args), "--data",
                        str(data)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@needs_fer
def test_half_rebundle_halves_the_files_and_keeps_the_speed(tmp_path: Path, tiny_dataset: Path) -> None:
    """bundle_model.py fer3 fer3 --half --keep-speed on a copy (measured on 90 validation faces, to stay quick):
    float16 weights, a model file and ONNX sibling about half the size, accuracy measured on the new file (within a
    face of the float32 one's), the speed carried over from the old card, a card that says float16, and a current
    ONNX sibling."""
    from ferkit.evaluate import evaluate_models
    from ferkit.infer.runtime import OnnxRuntime, make_runtime
    from ferkit.modelfile import SOURCE_DIGEST_KEY, file_digest, stores_half

    src = bundled_models()["fer3"]
    to, cards = copy_bundled("fer3", tmp_path)
    old_card = json.loads((cards / "fer3.json").read_text())
    bundle(src, "fer3", "--half", "--keep-speed", "--to", to, "--cards", cards, data=tiny_dataset)
    new = to / "fer3.safetensors"
    assert stores_half(new) and not stores_half(src)
    for suffix in (".safetensors", ".onnx"):
        assert new.with_suffix(suffix).stat().st_size < 0.6 * src.with_suffix(suffix).stat().st_size, suffix
    m_old = evaluate_models([str(src)], data=str(tiny_dataset), split="validation")
    m_new = read_meta(new).metrics
    assert m_new["n"] == m_old["n"] == 90 and abs(m_new["accuracy"] - m_old["accuracy"]) <= 1 / 90
    fps = read_meta(src).metrics["faces_per_second"]
    assert m_new["faces_per_second"] == round(old_card["faces_per_second"]) == fps
    assert json.loads((cards / "fer3.json").read_text())["speed_when"].endswith("kept by a re-bundle (--keep-speed)")
    assert "float16 weights" in (to / "fer3.md").read_text()
    rt = make_runtime(str(new))
    assert isinstance(rt, OnnxRuntime) and rt.props[SOURCE_DIGEST_KEY] == file_digest(new)


@needs_fer
def test_refresh_speed_rewrites_the_stored_speed_everywhere(tmp_path: Path) -> None:
    """bundle_model.py --refresh-speed on a copy of fer3: the file's faces/s, its card JSON and card row take the new
    measurement, the weights stay bit-identical and the ONNX sibling is rewritten for the new file's digest."""
    from safetensors.numpy import load_file

    from ferkit.modelfile import SOURCE_DIGEST_KEY, file_digest, onnx_sibling

    src = bundled_models()["fer3"]
    to, cards = copy_bundled("fer3", tmp_path)
    card = json.loads((cards / "fer3.json").read_text())
    card["faces_per_second"] = 1.0  # a stale figure to be replaced
    (cards / "fer3.json").write_text(json.dumps(card))
    bundle("fer3", "fer3", "--refresh-speed", "--to", to, "--cards", cards)
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
