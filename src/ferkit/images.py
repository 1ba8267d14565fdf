"""Reading images safely: any format Pillow reads, any mode, EXIF-rotated, with a pixel limit; large JPEGs at
reduced size when the caller does not need every pixel (:func:`read_image`)."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from ferkit.errors import ImageError, ImageTooLargeError

log = logging.getLogger(__name__)

#: Images above this many pixels are refused before decoding (a 30000×30000 JPEG would need 2.7 GB as RGB).
MAX_PIXELS = int(os.environ.get("FERKIT_MAX_PIXELS", str(64_000_000)))
#: Every still-image format ferkit reads, in folders as when named (each is one Pillow reads without plugins;
#: ``tests/test_trust.py`` checks that against ``Image.registered_extensions()``).
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp", ".avif",
    ".avifs", ".jp2", ".j2k", ".jpx", ".jpf", ".pgm", ".ppm", ".pbm", ".pnm", ".tga", ".qoi", ".pcx", ".sgi",
})
#: Formats that may hold several frames (animations, multi-page TIFFs): ``ferkit predict`` reads every frame.
MULTI_FRAME_SUFFIXES = frozenset({".gif", ".tif", ".tiff", ".webp", ".png", ".apng", ".avif", ".avifs"})

#: A reduced-size decode keeps at least this long a side: below it the gain in memory is small (a 3000×2000 photo
#: is 18 MB as RGB) and the faces of an ordinary photo would lose pixels the classifier uses.
DRAFT_MIN_SIDE = 1600
#: The reductions a JPEG decoder can do for free (scaling inside the inverse DCT), largest first.
_DRAFT_FACTORS = (8, 4, 2)

ImageInput = Union[str, os.PathLike, bytes, bytearray, np.ndarray, Image.Image]


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as an input file, found without reading it (None when it can): missing, a folder,
    a FIFO, device or socket (opening one can block forever: a FIFO nobody writes to), a symbolic link loop or a
    broken link, unreadable, empty. The one check every input file passes before it is opened.
    """
    from ferkit.fsutil import file_kind

    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return "no such file"
    except PermissionError:
        return "permission denied"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop (the link points back to itself)"
        return f"cannot read the file ({(e.strerror or str(e)).lower()})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not an image"
    if not stat.S_ISREG(st.st_mode):
        stdin = os.fspath(path) in ("/dev/stdin", "/dev/fd/0", "/proc/self/fd/0")
        return (f"is {file_kind(st.st_mode)}, not a regular file; skipped"
                + ("; to read an image from standard input, give '-'" if stdin else ""))
    if st.st_size == 0:
        return "empty file (0 bytes)"
    try:
        with open(path, "rb"):  # tried here so that a permission problem is named as such, not as a bad image
            pass
    except PermissionError:
        return "permission denied"
    except OSError as e:
        return f"cannot read the file ({(e.strerror or str(e)).lower()})"
    return None


def check_frame_pixels(im: Image.Image, name: str, max_pixels: int, frame: int | None = None) -> None:
    """Refuse an opened image, or the frame/page it is on, over ``max_pixels``; before its pixels are decoded.

    Raises:
        ImageTooLargeError: one line with the size and the limit.
    """
    w, h = im.size
    if w * h > max_pixels:
        where = "" if frame is None else f"frame {frame + 1}: "
        raise ImageTooLargeError(f"{name}: {where}image too large ({w}×{h} = {w * h:,} pixels; the limit is "
                                 f"{max_pixels:,})")


def _open(source: str | os.PathLike | bytes | bytearray, name: str, max_pixels: int,
          draft: Callable[[Image.Image], int] | None = None) -> tuple[Image.Image, int]:
    """Open and decode ``source``; ``(image, reduction)``. The pixel limit is checked on the size the header
    declares, before any decoding; ``draft(im)`` may then choose a reduction (1, 2, 4, 8) to decode a JPEG at."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageError(f"{name}: empty data (0 bytes)")
        fp: object = io.BytesIO(source)
    else:
        why = file_problem(source)
        if why:
            raise ImageError(f"{name}: {why}")
        fp = Path(source)  # Pillow opens it again and closes it after decoding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp)  # type: ignore[arg-type]
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"{name}: image too large (over {max_pixels:,} pixels)") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError … on bad data
        raise ImageError(f"{name}: cannot identify image file ({type(e).__name__})") from None
    check_frame_pixels(im, name, max_pixels)
    w, h = im.size
    reduction = 1
    if draft is not None and im.format == "JPEG":
        k = draft(im)
        if k > 1:
            try:
                # The decoder scales inside its inverse DCT: a 1/k decode needs 1/k² of the memory and less time.
                got = im.draft(im.mode, (max(1, w // k), max(1, h // k)))
                if got is not None:
                    reduction = max(1, round(w / got[1][2]))
            except Exception:  # a JPEG the decoder cannot scale (unusual tiling) is decoded in full
                reduction = 1
    try:
        im.load()
    except Exception as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None
    return im, reduction


def to_rgb_or_gray(im: Image.Image, name: str = "image") -> Image.Image:
    """Normalise mode: EXIF rotation applied, alpha composited on white, 16-bit/CMYK/palette converted."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF must not make a readable image unusable
        pass
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im).convert("RGB")
    elif im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit data keeps its brightness (65535 → 255), as an 8-bit save of the same picture would have it;
        # 32-bit integers with values above 16 bits are scaled by their maximum.
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.size else 0.0
        scale = 1.0 if im.mode == "I" and hi <= 255 else (255.0 / 65535.0 if hi <= 65535 else 255.0 / hi)
        im = Image.fromarray(np.rint(a * scale).clip(0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        bad = int(a.size - np.isfinite(a).sum())
        if bad:  # min/max would be NaN and the whole image black: refused, as NaN arrays are (_from_array)
            raise ImageError(f"{name}: float image holds {bad:,} NaN or infinite pixel(s); cannot tell what they show")
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 1.0)
        im = Image.fromarray(((a - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8), "L")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return im


def load_image(source: ImageInput, *, name: str | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Load any supported input as a uint8 array: H×W (grayscale) or H×W×3 (RGB).

    Args:
        source: a path, encoded bytes, a PIL image or a numpy array (H×W, H×W×1, H×W×3 RGB or H×W×4 RGBA).
        name: how to call the input in error messages (defaults to the path).
        max_pixels: refuse larger images before decoding them.

    Raises:
        ImageError: one line naming the input and what is wrong with it.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "array")
    if isinstance(source, Image.Image):
        label = name or "PIL image"
        if source.size[0] * source.size[1] > max_pixels:
            raise ImageTooLargeError(f"{label}: image too large ({source.size[0]}×{source.size[1]})")
        return np.asarray(to_rgb_or_gray(source, label))
    return read_image(source, name=name, max_pixels=max_pixels).image


@dataclass(frozen=True)
class Decoded:
    """An image read from a file or bytes by :func:`read_image`.

    Attributes:
        image: uint8 H×W or H×W×3 RGB, EXIF rotation applied; ``reduction`` times smaller than ``size`` per side.
        size: ``(width, height)`` of the full image (after EXIF rotation): the pixels boxes are reported in.
        reduction: 1, or 2, 4, 8 for a JPEG decoded at reduced size (pixel ``(x, y)`` of ``image`` covers
            ``(x·k … x·k + k-1, y·k … y·k + k-1)`` of the full image).
        frames: how many frames the file holds (animations, multi-page TIFFs); only the first is in ``image``.
    """

    image: np.ndarray
    size: tuple[int, int]
    reduction: int = 1
    frames: int = 1


def draft_reduction(width: int, height: int, need_side: int) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) that keeps the longest side at ``need_side`` and
    ``DRAFT_MIN_SIDE`` pixels or more: a 4000×3000 photo that a detector reads at 1600 px decodes at 1/2."""
    longest = max(width, height)
    floor = max(int(need_side), DRAFT_MIN_SIDE)
    return next((k for k in _DRAFT_FACTORS if -(-longest // k) >= floor), 1)


def read_image(source: str | os.PathLike | bytes | bytearray, *, name: str | None = None,
               max_pixels: int = MAX_PIXELS, need_side: Callable[[int, int], int] | None = None) -> Decoded:
    """Read a file or encoded bytes like :func:`load_image`, and say at which size and how many frames.

    Args:
        need_side: ``need_side(width, height)`` → the longest side the caller will look at for a full image of
            that size (after EXIF rotation); a JPEG is then decoded at the largest reduction that keeps it (see
            :func:`draft_reduction`). None decodes every pixel. The pixel limit applies to the full size either way.

    Raises:
        ImageError: one line naming the input and what is wrong with it.
    """
    if isinstance(source, (bytes, bytearray)):
        label = name or "uploaded bytes"
    elif isinstance(source, (str, os.PathLike)):
        label = name or str(source)
    else:
        raise ImageError(f"{name or type(source).__name__}: unsupported input type {type(source).__name__}")
    turned = False
    declared = (0, 0)

    def draft(im: Image.Image) -> int:
        nonlocal turned, declared
        w, h = declared = im.size
        try:  # orientations 5-8 swap width and height (ImageOps.exif_transpose reads the same tag)
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        except Exception:
            turned = False
        if turned:
            w, h = h, w
        return draft_reduction(w, h, need_side(w, h)) if need_side is not None else 1

    im, reduction = _open(source, label, max_pixels, draft if need_side is not None else None)
    n = frame_count(im)
    if n > 1:
        # One array comes back; `ferkit predict` reads every frame (see iter_frames), Recognizer.predict says so.
        log.warning("%s: %d frames (animation or multi-page file); only the first was read", label, n)
        im.seek(0)
    try:
        arr = np.asarray(to_rgb_or_gray(im, label))
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"{label}: cannot decode image ({e})") from None
    if arr.ndim < 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"{label}: image has no pixels")
    size = (int(arr.shape[1]), int(arr.shape[0]))
    if reduction > 1:
        # The full size is the header's, turned as the EXIF rotation turned the decoded image.
        w0, h0 = declared
        upright = (-(-w0 // reduction), -(-h0 // reduction))
        size = (w0, h0) if size == upright and not (upright[0] == upright[1] and turned) else (h0, w0)
    return Decoded(np.ascontiguousarray(arr), size, reduction, n)


def frame_count(im: Image.Image) -> int:
    """Frames in an opened image (1 for stills; a damaged animation counts what can be found).

    Every count is one the file's data backs: an APNG's header may declare any number (1,000,000 for a file of 2
    frames), so its frames are counted by their frame-control chunks (:func:`_apng_frames`).
    """
    try:
        n = int(getattr(im, "n_frames", 1) or 1)
    except Exception:  # n_frames seeks through the file; a truncated animation may fail part-way
        return 1
    if n > 1 and im.format == "PNG":
        n = min(n, _apng_frames(im))
    return max(n, 1)


def _apng_frames(im: Image.Image) -> int:
    """Frames an APNG holds: its fcTL chunks, plus the default image when that is not one of them (as Pillow counts
    it). Reads the 8-byte chunk headers only, skipping their data; the file position is restored."""
    import struct

    fp = getattr(im, "fp", None) or getattr(im, "_fp", None)  # Pillow keeps an APNG's file as _fp once loaded
    if fp is None:
        return 1
    try:
        pos = fp.tell()
    except (OSError, ValueError):
        return 1
    controls = 0
    try:
        fp.seek(8)  # the PNG signature
        while True:
            head = fp.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind == b"fcTL":
                controls += 1
            elif kind == b"IEND":
                break
            fp.seek(length + 4, os.SEEK_CUR)  # data and CRC
    except (OSError, ValueError, struct.error):
        pass
    finally:
        with contextlib.suppress(OSError, ValueError):
            fp.seek(pos)
    return controls + (1 if getattr(im, "default_image", False) else 0)


def iter_frames(path: str | os.PathLike, *, name: str | None = None,
                max_pixels: int = MAX_PIXELS) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, frame)`` for every frame of an animated GIF/WebP/PNG or multi-page TIFF (one for stills), each
    converted like :func:`load_image`; frames are decoded one at a time.

    Raises:
        ImageError: the file cannot be read (a frame that fails to decode ends the iteration with this error).
    """
    label = name or str(path)
    im, _ = _open(path, label, max_pixels)
    n = frame_count(im)
    for i in range(n):
        try:
            im.seek(i)
            check_frame_pixels(im, label, max_pixels, i)  # every page of a TIFF has its own size
            arr = np.asarray(to_rgb_or_gray(im.copy() if n > 1 else im, label))
        except EOFError:
            return
        except ImageError:
            raise
        except Exception as e:
            raise ImageError(f"{label}: frame {i} of {n} cannot be decoded ({e})") from None
        yield i, np.ascontiguousarray(arr)


def _from_array(a: np.ndarray, name: str) -> np.ndarray:
    if a.size == 0:
        raise ImageError(f"{name}: empty array")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind not in "uif":
        raise ImageError(f"{name}: expected a numeric array, got dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ImageError(f"{name}: the array holds NaN or infinite values")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] == 4:
        rgb = a[:, :, :3].astype(np.float32)
        alpha = a[:, :, 3:4].astype(np.float32) / (255.0 if a.dtype == np.uint8 else max(float(a.max()), 1.0))
        a = rgb * alpha + 255.0 * (1 - alpha)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ImageError(f"{name}: expected an H×W or H×W×3 array, got shape {tuple(a.shape)}")
    if a.dtype != np.uint8:
        af = a.astype(np.float32)
        if a.dtype.kind == "f":  # floats: 0..1 is scaled to 0..255, anything else taken as 0..255
            if af.max() <= 1.0 and af.min() >= 0.0:
                af = af * 255.0
        elif a.dtype == np.uint16:  # 65535 → 255, exactly as a 16-bit PNG/TIFF is read (to_rgb_or_gray)
            af = af * (255.0 / 65535.0)
        elif a.dtype.itemsize >= 2 and af.max() > 255:
            # wider integers as 32-bit files: taken as 0..255 when they fit, else 16-bit, else scaled by their maximum
            af = af * (255.0 / 65535.0 if af.max() <= 65535 else 255.0 / float(af.max()))
        a = np.rint(af).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def to_gray(a: np.ndarray) -> np.ndarray:
    """RGB → luminance (ITU-R 601, as Pillow's ``convert('L')``); grayscale passes through."""
    if a.ndim == 2:
        return a
    g = a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
    return np.round(g).astype(np.uint8)


def resize_face(a: np.ndarray, size: int, *, gray: bool = True) -> np.ndarray:
    """Resize a face crop to size×size (area interpolation when shrinking, as the datasets were made)."""
    import cv2

    if gray:
        a = to_gray(a)
    h, w = a.shape[:2]
    if (h, w) == (size, size):
        return a
    interp = cv2.INTER_AREA if h > size or w > size else cv2.INTER_LINEAR
    return cv2.resize(a, (size, size), interpolation=interp)
