"""``ferkit export --format ferkit --classes``: a model cut down to some of its classes (restrict_classes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ferkit.cli import main
from ferkit.errors import ModelFileError
from ferkit.export import pack_ensemble, restrict_classes
from ferkit.modelfile import ModelMeta, load_model, read_meta, save_model, stores_half
from ferkit.models import create_model
from ferkit.models.ensemble import ViewTTA

SEVEN = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
KEEP = ["happy", "sad", "neutral"]
ROWS = [SEVEN.index(c) for c in KEEP]


def seven_class_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = create_model("fastcnn", num_classes=7).eval()
    for m in net.modules():  # BatchNorm statistics that are not the identity, so the cut is tested on real numbers
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return save_model(path, net, ModelMeta(arch="fastcnn", classes=SEVEN, temperature=1.7), json_sidecar=False)


def test_a_cut_network_gives_the_rows_of_its_classes(tmp_path: Path) -> None:
    src = seven_class_file(tmp_path / "seven.safetensors", 0)
    r = restrict_classes(str(src), KEEP, str(tmp_path / "three.safetensors"), data=None)
    net7, _ = load_model(src)
    net3, meta = load_model(r["path"])
    assert meta.classes == tuple(KEEP) and meta.arch == "fastcnn"
    assert meta.training["restricted_from"] == str(src) and meta.training["restricted_from_classes"] == list(SEVEN)
    assert meta.temperature == 1.0  # the seven-class calibration does not carry over to three classes
    x = torch.rand(6, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(net3(x), net7(x)[:, ROWS])
    # order is the caller's
    r2 = restrict_classes(str(src), ["neutral", "happy"], str(tmp_path / "two.safetensors"), data=None)
    net2, _ = load_model(r2["path"])
    with torch.no_grad():
        torch.testing.assert_close(net2(x), net7(x)[:, [6, 3]])


def test_a_cut_ensemble_with_views_averages_each_members_softmax_over_the_kept_classes(tmp_path: Path) -> None:
    a, b = seven_class_file(tmp_path / "a.safetensors", 1), seven_class_file(tmp_path / "b.safetensors", 2)
    packed = tmp_path / "ab.safetensors"
    pack_ensemble([str(a), str(b)], str(packed))
    net, meta = load_model(packed)
    viewed = tmp_path / "ab-views.safetensors"
    save_model(viewed, ViewTTA(net, ("orig", "zoom_flip")),
               ModelMeta(arch=f"views[orig+zoom_flip]({meta.arch})", classes=SEVEN), json_sidecar=False)
    r = restrict_classes(str(viewed), KEEP, str(tmp_path / "cut.safetensors"), data=None)
    cut, cmeta = load_model(r["path"])
    assert cmeta.arch == "views[orig+zoom_flip](ensemble(fastcnn,fastcnn))"
    members = [load_model(p)[0] for p in (a, b)]
    x = torch.rand(5, 1, 48, 48)
    from ferkit.models.ensemble import views_of

    with torch.no_grad():
        want = torch.stack([torch.softmax(m(v)[:, ROWS], 1) for v in views_of(x, ("orig", "zoom_flip"))
                            for m in members]).mean(0)
        torch.testing.assert_close(torch.softmax(cut(x), 1), want, atol=1e-5, rtol=1e-5)


def test_cut_bundled_fer7_is_scored_and_calibrated_on_validation(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "fer7-3.safetensors"
    r = restrict_classes("fer7", KEEP, str(out), data=str(data_dir))
    m = read_meta(out).metrics
    # fer7 learnt the FER+ votes, so the cut is scored on them: the 2,398 happy/sad/neutral faces with a FER+
    # majority, and beside it on the 2,155 faces of those three folders
    assert m["n"] == 2398 and m["n_folder"] == 2155 and m["val_split"].startswith("validation")
    assert 0.80 < m["accuracy"] < 0.97 and 0.5 < m["accuracy_folder"] < 0.9 and r["metrics"] == m
    assert "calibration" in m and read_meta(out).temperature > 0
    # the same cut stored as float16 through the CLI: half the file, scored as stored, within two faces
    half = tmp_path / "fer7-3h.safetensors"
    assert main(["export", "--model", "fer7", "--format", "ferkit", "--classes", ",".join(KEEP), "--half",
                 "--data", str(data_dir), "--out", str(half)]) == 0
    assert stores_half(half) and not stores_half(out) and half.stat().st_size < 0.6 * out.stat().st_size
    mh = read_meta(half).metrics
    assert mh["n"] == 2398 and abs(mh["accuracy"] - m["accuracy"]) <= 2 / 2398


def test_export_classes_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               one_line_error: Callable[[str], str]) -> None:
    src = seven_class_file(tmp_path / "seven.safetensors", 0)
    with pytest.raises(ModelFileError, match="cannot keep classes contempt"):
        restrict_classes(str(src), ["happy", "contempt"], str(tmp_path / "x.safetensors"), data=None)
    capsys.readouterr()
    out = tmp_path / "y.safetensors"
    assert main(["export", "--model", str(src), "--format", "ferkit", "--classes", "happy,contempt",
                 "--out", str(out)]) != 0
    assert "contempt" in one_line_error(capsys.readouterr().err) and not out.exists()
    assert main(["export", "--model", str(src), "--classes", "happy,sad", "--out", str(tmp_path / "z.onnx")]) == 2
    assert "--format ferkit" in one_line_error(capsys.readouterr().err)
    assert main(["export", "--model", str(src), "--half", "--out", str(tmp_path / "z.onnx")]) == 2
    assert "--format ferkit" in one_line_error(capsys.readouterr().err) and not (tmp_path / "z.onnx").exists()
    assert main(["export", "--model", f"{src},{src}", "--format", "ferkit", "--classes", "happy,sad",
                 "--out", str(out)]) == 2
    assert "pack the ensemble first" in one_line_error(capsys.readouterr().err) and not out.exists()
    assert main(["export", "--model", str(src), "--format", "ferkit", "--classes", "happy,sad,neutral",
                 "--out", str(out)]) == 0
    assert read_meta(out).classes == tuple(KEEP) and "wrote" in capsys.readouterr().out
