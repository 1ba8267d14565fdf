"""Dataset download for online users (``ferkit download fer2013``) through kagglehub."""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

from ferkit.errors import DownloadError  # noqa: F401  (re-exported: ferkit.download.DownloadError)

log = logging.getLogger(__name__)
KAGGLE_DATASET = "msambare/fer2013"  # the FER2013 images as train/ and test/ folders of class folders
MANUAL = ("download FER2013 by hand from Kaggle (dataset 'msambare/fer2013', or fer2013.csv from the 'Challenges in "
          "Representation Learning: Facial Expression Recognition Challenge') and put its train/ and test/ folders "
          "(or fer2013.csv) in {to}")


def _online(host: str = "www.kaggle.com", port: int = 443, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_fer2013(to: str | Path) -> Path:
    """Fetch FER2013 with kagglehub and lay it out under ``to`` as a dataset root (train/, test/).

    Raises:
        DownloadError: offline, kagglehub missing, or the download failed; the message says what to do by hand.
    """
    to = Path(to)
    manual = MANUAL.format(to=to)
    try:
        import kagglehub
    except ImportError:
        raise DownloadError(f"kagglehub is not installed (pip install 'ferkit[download]'); or {manual}") from None
    if not _online():
        raise DownloadError(f"cannot reach Kaggle (offline?); {manual}")
    try:
        src = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as e:  # kagglehub raises many kinds (auth, HTTP, network)
        raise DownloadError(f"download failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); {manual}") from None
    to.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        found = next(iter(sorted(src.rglob(split))), None)
        if found and found.is_dir():
            shutil.copytree(found, to / split, dirs_exist_ok=True)
    if not (to / "train").exists():
        raise DownloadError(f"{src}: downloaded, but no train/ folder inside; {manual}")
    return to
