"""distill_views: the teachers' soft labels for a fixed set of augmented views, computed once and stored."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ferkit.cli import main
from ferkit.config import make_config
from ferkit.data import find_dataset, load_split
from ferkit.data.augment import BatchAugment
from ferkit.modelfile import ModelMeta, save_model
from ferkit.models import create_model
from ferkit.preprocess import DEFAULT_MEAN, DEFAULT_STD
from ferkit.train.distill import VIEWS_FILE, StoredViews, Teachers

H3 = ("happy", "sad", "neutral")


def teacher_file(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = create_model("fastcnn", num_classes=3).eval()
    return save_model(folder / f"teacher{seed}.safetensors", net, ModelMeta(arch="fastcnn", classes=H3))


@pytest.fixture(scope="module")
def faces(make_tiny_dataset: Callable[..., Path]) -> tuple[Path, torch.Tensor]:
    data = make_tiny_dataset(10, 4)
    loaded = load_split(find_dataset(data, list(H3)).split("train"), 48)
    return data, torch.from_numpy(loaded.images)


def test_views_are_the_teachers_labels_of_stored_augmented_faces(faces: tuple[Path, torch.Tensor],
                                                                 tmp_path: Path) -> None:
    _, images = faces
    cfg = make_config("quick", {"distill_views": 3, "teacher": "x", "seed": 5})
    teachers = Teachers(str(teacher_file(tmp_path, 1)), list(H3))
    augment = BatchAugment(cfg, DEFAULT_MEAN, DEFAULT_STD)
    views = StoredViews.build(teachers, images, augment, cfg, progress=False)
    assert views.images.shape == (3, len(images), 48, 48) and views.images.dtype == torch.uint8
    assert views.logp.shape == (3, len(images), 3) and views.logp.dtype == torch.float16
    # augmented: not the faces themselves, and each view differs from the others
    assert not torch.equal(views.images[0], images)
    assert not torch.equal(views.images[0], views.images[1])
    # the stored log-probs are the teachers' own on exactly those stored faces
    for v in range(3):
        want = teachers.logits(views.images[v].float().div(255).unsqueeze(1), cfg.distill_temp)
        torch.testing.assert_close(views.logp[v].float(), want, atol=2e-3, rtol=2e-3)
    # deterministic: the same run makes the same views (so a key names them)
    again = StoredViews.build(teachers, images, augment, cfg, progress=False)
    assert torch.equal(again.images, views.images) and again.key == views.key

    # the key changes with the teachers' weights, the augmentation and the seed, not with the number of views
    other = Teachers(str(teacher_file(tmp_path, 2)), list(H3))
    assert StoredViews.make_key(other, images, cfg) != views.key
    for change in ({"rotate": 5.0}, {"seed": 6}):
        other_cfg = make_config("quick", {"distill_views": 3, "teacher": "x", "seed": 5, **change})
        assert StoredViews.make_key(teachers, images, other_cfg) != views.key
    more_cfg = make_config("quick", {"distill_views": 5, "teacher": "x", "seed": 5})
    assert StoredViews.make_key(teachers, images, more_cfg) == views.key

    # growing: five views made on top of the three keep those three and equal five made from scratch
    grown = StoredViews.build(teachers, images, augment, more_cfg, progress=False, base=views)
    fresh = StoredViews.build(teachers, images, augment, more_cfg, progress=False)
    assert grown.views == 5 and torch.equal(grown.images[:3], views.images)
    assert torch.equal(grown.images, fresh.images) and torch.equal(grown.logp, fresh.logp)
    with pytest.raises(ValueError, match="other settings"):
        StoredViews.build(teachers, images, augment, more_cfg, progress=False,
                          base=StoredViews(views.images, views.logp, "another key"))

    # saved and loaded back only under its own key
    path = tmp_path / VIEWS_FILE
    views.save(path)
    back = StoredViews.load(path, views.key)
    assert back is not None and torch.equal(back.images, views.images) and torch.equal(back.logp, views.logp)
    first = StoredViews.load(path, views.key, views=2)  # fewer asked: the first ones
    assert first.views == 2 and torch.equal(first.logp, views.logp[:2])
    assert StoredViews.load(path, views.key, views=7).views == 3  # more asked: what is stored, to grow
    assert StoredViews.load(path, "another key") is None
    assert StoredViews.load(tmp_path / "missing.safetensors", views.key) is None
    path.write_bytes(b"not a safetensors file")
    assert StoredViews.load(path, views.key) is None

    # a batch takes, for each face, one of its own stored views with that view's labels
    j = torch.tensor([4, 0, 4, 9])
    x01, soft = views.batch(j, torch.Generator().manual_seed(0))
    assert x01.shape == (4, 1, 48, 48)
    for row, i in enumerate(j.tolist()):
        hits = [v for v in range(3) if torch.equal((x01[row, 0] * 255).round().to(torch.uint8), views.images[v, i])]
        assert hits and torch.equal(soft[row], views.logp[hits[0], i].float())

    # view_flip: the same stored views, some mirrored, with the labels of the view they came from
    x01, soft = views.batch(torch.arange(10).repeat(8), torch.Generator().manual_seed(1), flip=True)
    flipped = 0
    for row, i in enumerate(torch.arange(10).repeat(8).tolist()):
        face = (x01[row, 0] * 255).round().to(torch.uint8)
        same = [v for v in range(3) if torch.equal(face, views.images[v, i])]
        mirrored = [v for v in range(3) if torch.equal(face, views.images[v, i].flip(-1))]
        assert same or mirrored
        flipped += not same
        assert torch.equal(soft[row], views.logp[(same or mirrored)[0], i].float())
    assert 10 < flipped < 70  # about half of 80


def test_distill_with_stored_views_pays_the_teachers_once(faces: tuple[Path, torch.Tensor], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data, images = faces
    n = len(images)
    teacher = teacher_file(tmp_path, 3)
    calls: list[int] = []
    real = Teachers.logits

    def counted(self: Teachers, x01: torch.Tensor, temperature: float) -> torch.Tensor:
        calls.append(len(x01))
        return real(self, x01, temperature)

    monkeypatch.setattr(Teachers, "logits", counted)
    out = tmp_path / "student"
    argv = ["distill", "--teacher", str(teacher), "--data", str(data), "--epochs", "3", "--batch-size", "8",
            "--out", str(out), "--views", "2"]
    assert main(argv) == 0
    assert sum(calls) == 2 * n  # every face labelled once per view, then never again over 3 epochs
    assert f"teacher soft labels: 2 views of {n} faces" in capsys.readouterr().out
    assert (out / VIEWS_FILE).is_file() and (out / "model.safetensors").is_file()

    calls.clear()  # the same run again: the stored views are loaded, the teachers not asked at all
    assert main(argv) == 0
    assert calls == [] and "2 stored views" in capsys.readouterr().out

    calls.clear()  # a third view asked of the same run: only that view is labelled, the two stored ones are kept
    assert main(argv[:-1] + ["3"]) == 0
    assert sum(calls) == n and f"3 views of {n} faces (2 of them stored before)" in capsys.readouterr().out

    calls.clear()  # without distill_views the teachers label every batch of every epoch
    assert main(argv[:-2] + ["--out", str(tmp_path / "plain")]) == 0
    assert sum(calls) == 3 * (n // 8) * 8


def test_distill_views_needs_teachers(faces: tuple[Path, torch.Tensor], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    data, _ = faces
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--set", "distill_views=4"]) == 2
    assert "distill_views needs teachers" in capsys.readouterr().err
