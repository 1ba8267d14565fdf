"""Flip test-time augmentation carried by the model itself (``flip(<arch>)``): one model file, applied everywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ferkit import Recognizer
from ferkit.images import load_image
from ferkit.modelfile import bundled_models, load_model, read_meta
from ferkit.models import create_model
from shared_data import VALIDATION, needs_fer

REPO = Path(__file__).resolve().parents[1]
FER3_ARCH = read_meta(bundled_models()["fer3"]).arch  # the bundled fer3's network, whichever it is now


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """24 real FER2013 validation faces (uint8 48×48), 8 each of happy, sad and neutral."""
    files = [f for c in ("happy", "sad", "neutral") for f in sorted((VALIDATION / c).glob("*.jpg"))[:8]]
    return np.stack([load_image(f) for f in files])


@needs_fer
def test_flip_model_averages_the_face_and_its_mirror(faces: np.ndarray) -> None:
    net, _ = load_model("fer3")
    wrapped = create_model(f"flip({FER3_ARCH})", num_classes=3).eval()
    assert set(wrapped.state_dict()) == {f"net.{k}" for k in net.state_dict()}
    wrapped.net.load_state_dict(net.state_dict())
    x = (torch.as_tensor(faces).float()[:, None] / 255 - 0.5) / 0.25
    with torch.no_grad():
        want = (torch.softmax(net(x), 1) + torch.softmax(net(x.flip(3)), 1)) / 2
        torch.testing.assert_close(torch.softmax(wrapped(x), 1), want, atol=1e-6, rtol=1e-5)
        # a mirrored face gets the same scores (the point of the augmentation), unlike the bare net's
        torch.testing.assert_close(wrapped(x.flip(3)), wrapped(x), atol=1e-5, rtol=1e-5)
        assert (torch.softmax(net(x.flip(3)), 1) - torch.softmax(net(x), 1)).abs().max() > 0.01


@needs_fer
def test_wrap_script_recognizer_and_onnx_agree(faces: np.ndarray, tmp_path: Path) -> None:
    """scripts/wrap_flip.py turns a model file into flip(...); torch and onnxruntime give the same TTA scores."""
    out = tmp_path / "fer3-flip.safetensors"
    subprocess.run([sys.executable, str(REPO / "scripts" / "wrap_flip.py"), "fer3", str(out)], check=True,
                   capture_output=True)
    assert read_meta(out).arch == f"flip({FER3_ARCH})"
    p_torch = Recognizer(str(out), backend="torch").classify(faces)
    onnx = Recognizer(str(out), backend="onnx")
    p_onnx = onnx.classify(faces)
    np.testing.assert_allclose(p_torch, p_onnx, atol=1e-4)
    np.testing.assert_allclose(onnx.classify(faces[:, :, ::-1].copy()), p_onnx, atol=1e-4)
    plain = Recognizer("fer3", backend="onnx").classify(faces)
    assert np.abs(plain - p_onnx).max() > 0.01


def test_flip_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="no architecture inside flip"):
        create_model("flip()", num_classes=3)


@needs_fer
def test_views_model_averages_exactly_its_views(faces: np.ndarray) -> None:
    """views[orig+zoom_flip](a): the mean softmax of the face and the mirrored centre crop of its 12.5% upscale, the
    very crop ten-crop TTA uses (evaluate.tta_views' fifth crop, mirrored)."""
    from ferkit.evaluate import tta_views
    from ferkit.models.ensemble import view

    net, _ = load_model("fer3")
    wrapped = create_model(f"views[orig+zoom_flip]({FER3_ARCH})", num_classes=3).eval()
    assert set(wrapped.state_dict()) == {f"net.{k}" for k in net.state_dict()}
    wrapped.net.load_state_dict(net.state_dict())
    x = (torch.as_tensor(faces).float()[:, None] / 255 - 0.5) / 0.25
    crops = tta_views(x, "tencrop")
    torch.testing.assert_close(view(x, "zoom"), crops[4])
    torch.testing.assert_close(view(x, "zoom_flip"), crops[9])
    with torch.no_grad():
        want = (torch.softmax(net(x), 1) + torch.softmax(net(crops[9]), 1)) / 2
        torch.testing.assert_close(torch.softmax(wrapped(x), 1), want, atol=1e-6, rtol=1e-5)
        # not the flip model: a different second view gives different scores
        flip = (torch.softmax(net(x), 1) + torch.softmax(net(x.flip(3)), 1)) / 2
        assert (want - flip).abs().max() > 0.01


@needs_fer
def test_views_of_an_ensemble_run_the_same_in_torch_and_onnx(faces: np.ndarray, tmp_path: Path) -> None:
    """wrap_flip.py --views on a packed ensemble: one model file whose TTA the Recognizer applies in both backends."""
    from ferkit.export import pack_ensemble

    packed = tmp_path / "ens.safetensors"
    pack_ensemble(["fer3", "fer3"], str(packed), score=False)
    out = tmp_path / "ens-views.safetensors"
    subprocess.run([sys.executable, str(REPO / "scripts" / "wrap_flip.py"), str(packed), str(out), "--views",
                    "orig,flip,zoom,zoom_flip"], check=True, capture_output=True)
    assert read_meta(out).arch == f"views[orig+flip+zoom+zoom_flip](ensemble({FER3_ARCH},{FER3_ARCH}))"
    p_torch = Recognizer(str(out), backend="torch").classify(faces)
    p_onnx = Recognizer(str(out), backend="onnx").classify(faces)
    np.testing.assert_allclose(p_torch, p_onnx, atol=1e-4)
    # both views and their mirrors are in: a mirrored face scores the same
    np.testing.assert_allclose(Recognizer(str(out), backend="onnx").classify(faces[:, :, ::-1].copy()), p_onnx,
                               atol=1e-4)
    assert np.abs(Recognizer("fer3", backend="onnx").classify(faces) - p_onnx).max() > 0.01


def test_views_members_inside_an_ensemble_and_bad_views() -> None:
    from ferkit.models.ensemble import ViewTTA, tta_arch, tta_inner

    net = create_model("ensemble(views[orig+zoom_flip](fastcnn),flip(fastcnn))", num_classes=3)
    assert [type(m).__name__ for m in net.members] == ["ViewTTA", "FlipTTA"]
    assert net.members[0].views == ("orig", "zoom_flip")
    assert tta_arch(("orig", "flip"), "fastcnn") == "flip(fastcnn)"
    assert tta_inner("views[zoom](fastcnn_xl)") == "fastcnn_xl" and tta_inner("fastcnn") is None
    assert isinstance(create_model("views[zoom](fastcnn)", num_classes=3), ViewTTA)
    for bad in ("views[orig+sideways](fastcnn)", "views[orig+orig](fastcnn)", "views[](fastcnn)"):
        with pytest.raises(ValueError, match="give distinct views"):
            create_model(bad, num_classes=3)
    with pytest.raises(ValueError, match="no architecture inside"):
        create_model("views[orig]()", num_classes=3)


@needs_fer
def test_unpack_members_gives_back_each_network(faces: np.ndarray, tmp_path: Path) -> None:
    """scripts/unpack_members.py on views[...](ensemble(a,b)): each member file is that network, bare and
    uncalibrated; a second unpack into the same folder overwrites nothing; a single network is refused."""
    from ferkit.export import pack_ensemble

    from ferkit.modelfile import save_model

    net, meta = load_model("fer3")
    other, _ = load_model("fer3")  # a second, different network: fer3 with its weights scaled
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)
    save_model(tmp_path / "other.safetensors", other, meta)
    packed, wrapped = tmp_path / "ens.safetensors", tmp_path / "ens-views.safetensors"
    pack_ensemble(["fer3", str(tmp_path / "other.safetensors")], str(packed), score=False)
    subprocess.run([sys.executable, str(REPO / "scripts" / "wrap_flip.py"), str(packed), str(wrapped), "--views",
                    "orig,zoom_flip"], check=True, capture_output=True)
    script = [sys.executable, str(REPO / "scripts" / "unpack_members.py")]
    out = tmp_path / "members"
    subprocess.run([*script, str(wrapped), str(out)], check=True, capture_output=True)
    files = sorted(out.glob("*.safetensors"))
    assert [f.name for f in files] == ["ens-views-m0.safetensors", "ens-views-m1.safetensors"]
    x = (torch.as_tensor(faces).float()[:, None] / 255 - 0.5) / 0.25
    for f, want in zip(files, (net, other)):
        member, m_meta = load_model(f)
        assert m_meta.arch == FER3_ARCH and m_meta.temperature == 1.0 and not m_meta.temperature_poly
        with torch.no_grad():
            torch.testing.assert_close(member(x), want(x))
    with torch.no_grad():
        assert (net(x) - other(x)).abs().max() > 0.1  # the two members really differ
    before = files[0].read_bytes()
    again = subprocess.run([*script, str(wrapped), str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert files[0].read_bytes() == before
    single = subprocess.run([*script, "fer3", str(tmp_path / "none")], capture_output=True, text=True)
    assert single.returncode == 2 and "not an ensemble" in single.stderr and not (tmp_path / "none").exists()
