"""ferkit in your own Ray Data pipelines: :class:`Recognise`, a callable class for ``Dataset.map_batches``.

    >>> import ray
    >>> from ferkit.ray import Recognise
    >>> ds = ray.data.read_images("s3://bucket/photos/", include_paths=True, mode="RGB")
    >>> faces = ds.map_batches(Recognise, fn_constructor_kwargs={"model": "fer3"},
    ...                        compute=ray.data.ActorPoolStrategy(size=8), num_cpus=1, batch_size=32)
    >>> faces.write_parquet("s3://bucket/faces/")

Each actor loads the model once. The output has the columns of ``ferkit batch`` (:mod:`ferkit.batch.rows`): one row
per face, and one per image without a face (``status == "no_face"``) or that could not be used (``"error"``).
Needs ``pip install 'ferkit[ray]'`` (pyarrow comes with Ray Data).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["Recognise"]


class Recognise:
    """Recognise the faces in a batch of images: ``ds.map_batches(Recognise, fn_constructor_kwargs={...})``.

    Args:
        model: a bundled model's name or a model file every worker can read.
        column: the column holding the images: uint8 arrays (H×W×3 RGB or H×W, as ``ray.data.read_images`` gives
            them) or encoded bytes (as ``ray.data.read_binary_files`` gives them).
        path_column: the column naming each image (``"path"`` with ``include_paths=True``); without it the rows'
            ``file`` is the image's index in its batch.
        threads: CPU threads per actor (match the ``num_cpus`` you give ``map_batches``).
        **recognizer: ``Recognizer`` keywords: ``detector``, ``min_det_score``, ``min_score``, ``detect_size``.
    """

    def __init__(self, model: str = "fer3", *, column: str = "image", path_column: str = "path", threads: int = 1,
                 **recognizer: Any) -> None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import cv2

        cv2.setNumThreads(threads)
        from ferkit.infer.recognizer import Recognizer
        from ferkit.modelfile import file_digest, resolve_model_path

        self.rec = Recognizer(model, **recognizer)
        self.column, self.path_column = column, path_column
        self.extra = {"model": str(model), "model_digest": file_digest(resolve_model_path(model))}

    def __call__(self, batch: dict[str, Any]) -> Any:
        """A batch (``dict`` of columns, Ray Data's default format) → an Arrow table of result rows."""
        from ferkit.batch.rows import ERROR, NO_FACE, face_row, status_row, to_table
        from ferkit.errors import ImageError

        images = list(batch[self.column])
        names = ([str(p) for p in batch[self.path_column]] if self.path_column in batch
                 else [str(i) for i in range(len(images))])
        rows: list[dict[str, Any]] = []
        arrays, kept = [], []
        for name, img in zip(names, images):
            try:
                arrays.append(self.rec.read(bytes(img) if isinstance(img, (bytes, bytearray, memoryview)) else img,
                                            name=name))
                kept.append(name)
            except ImageError as e:
                rows.append(status_row(name, ERROR, str(e).removeprefix(f"{name}: "), **self.extra))
        for name, res in zip(kept, self.rec.predict_arrays(arrays, kept, keep_images=False)):
            if not res.faces:
                rows.append(status_row(name, NO_FACE, "no face found", **self.extra))
            for k, f in enumerate(res.faces):
                rows.append(face_row(name, f, k, **self.extra))
        return to_table(rows, self.rec.classes)
