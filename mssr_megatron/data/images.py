"""Image decoding: NVIDIA DALI's CPU decoder where DALI is installed, PIL otherwise.

    decode_image(b"\\x89PNG...")          # -> PIL.Image.Image, mode RGB
    decode_image("/data/images/0001.jpg")
    decode_images([...])                  # a batch (DALI decodes it on its worker threads)
    image_backend()                       # "dali" or "pil"
    image_size(data)                      # (width, height) from the header only, no pixel decode
    bounded_size(640, 480, 262144, 4194304, 28)   # (width, height) the image is resized to: see below
    resize_to_bounds(image, 262144, 4194304, 28)

Both backends return the same thing: an RGB PIL image in display orientation (EXIF rotation applied, as
transformers' own `load_image` does), so what the processor sees does not depend on which backend ran. DALI is the
fast path on clusters (about 2x PIL on 2 CPU threads, see PLATFORM_NOTES) but is a ~1 GB optional dependency, so
everything works without it. A format DALI rejects (e.g. GIF) falls back to PIL for that one image; only data that
neither can decode raises `ImageDecodeError`.

Pixel bounds (data.min_pixels / data.max_pixels): an image is resized, aspect ratio kept, so that its pixel count
lies within the bounds and both sides are multiples of `factor` (patch_size x spatial_merge_size, 28 for
Qwen2.5-VL). The rule is the one the Qwen2-VL image processor applies with its own bounds (transformers'
`smart_resize`; the tests compare the two): round each side to the nearest multiple; if that has too many pixels,
scale down to max_pixels and round down; too few, scale up to min_pixels and round up. Applied here, before the
processor, so that every engine (HF, SGLang, vLLM, each with its own copy of the processor) gets the same image;
the processor then leaves it as it is when its own bounds contain these (checked in data/prompts.py).
"""

from __future__ import annotations

import io
import math
import os
import threading
from typing import Sequence

from PIL import Image, ImageOps

__all__ = [
    "ImageDecodeError", "bounded_size", "decode_image", "decode_images", "image_backend", "image_size",
    "read_image_bytes", "resize_to_bounds",
]

# One DALI pipeline per process, built on first use: building one costs ~100 ms, decoding a small image ~1 ms.
_DALI_BATCH = 16  # the pipeline's max batch; decode_images feeds at most this many at once
_DALI_THREADS = 2
_dali_lock = threading.Lock()  # a DALI pipeline is not thread-safe; feed_input + run must be atomic
_dali_pipe = None
_dali_available: bool | None = None  # None = not probed yet
_force_backend: str | None = os.environ.get("MSSR_IMAGE_BACKEND") or None  # "pil" forces the fallback (tests, debug)


class ImageDecodeError(ValueError):
    """The data is not a decodable image (or the file does not exist)."""


def _dali_importable() -> bool:
    global _dali_available
    if _dali_available is None:
        try:
            import nvidia.dali  # noqa: F401
            from nvidia.dali import fn  # noqa: F401
        except Exception:  # ImportError, or a broken install that fails while loading its libraries
            _dali_available = False
        else:
            _dali_available = True
    return _dali_available


def image_backend() -> str:
    """'dali' when NVIDIA DALI is importable (and MSSR_IMAGE_BACKEND is not 'pil'), else 'pil'."""
    if _force_backend == "pil":
        return "pil"
    return "dali" if _dali_importable() else "pil"


def set_image_backend(name: str | None) -> None:
    """Force 'pil' or 'dali' (None = automatic). Used by tests to compare the two on the same data."""
    global _force_backend
    if name not in (None, "pil", "dali"):
        raise ValueError(f"image backend must be 'pil', 'dali' or None, not {name!r}")
    if name == "dali" and not _dali_importable():
        raise ImportError("image backend 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120")
    _force_backend = name


def read_image_bytes(data: bytes | str | os.PathLike) -> bytes:
    """The encoded bytes of `data` (bytes as they are, a path read from disk)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    path = os.fspath(data)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read image file {path!r}: {exc.strerror or exc}") from None


def image_size(data: bytes | str | os.PathLike) -> tuple[int, int]:
    """(width, height) in display orientation, reading only the header (cheap enough for every record at load).

    `verify()` also checks what can be checked without decoding (PNG chunk CRCs), so that corrupt files are found
    when the dataset is read, not in the middle of a training step."""
    source = io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else os.fspath(data)
    if isinstance(source, str) and not os.path.isfile(source):
        raise ImageDecodeError(f"no such image file {source!r}")
    try:
        with Image.open(source) as img:
            img.verify()  # must come right after open; the image is unusable afterwards, hence the second open
        if isinstance(source, io.BytesIO):
            source.seek(0)
        with Image.open(source) as img:
            width, height = img.size
            # EXIF orientations 5-8 swap width and height once the rotation is applied.
            orientation = img.getexif().get(0x0112, 1)
    except Exception as exc:  # PIL raises several exception types for bad data
        raise ImageDecodeError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _decode_pil(encoded: bytes, source: bytes | str | os.PathLike) -> Image.Image:
    try:
        with Image.open(io.BytesIO(encoded)) as img:
            img.load()  # decode now: a truncated file fails here
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except Exception as exc:
        # A file whose header reads (the load-time check) but whose body is cut short fails only here, mid-run:
        # name the file, so that it can be found among thousands.
        what = "in-memory image" if isinstance(source, (bytes, bytearray, memoryview)) else repr(os.fspath(source))
        raise ImageDecodeError(f"{what} is not a decodable image ({type(exc).__name__}: {exc})") from None


def _get_dali_pipe():
    """The shared CPU pipeline: external encoded bytes -> fn.decoders.image(device='cpu', RGB)."""
    global _dali_pipe
    if _dali_pipe is None:
        from nvidia.dali import Pipeline, fn, types

        # device_id=None makes a CPU-only pipeline: no CUDA context, works on machines without a GPU.
        pipe = Pipeline(batch_size=_DALI_BATCH, num_threads=_DALI_THREADS, device_id=None, prefetch_queue_depth=1)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # adjust_orientation (EXIF) matches ImageOps.exif_transpose on the PIL path.
            decoded = fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=True)
            pipe.set_outputs(decoded)
        pipe.build()
        _dali_pipe = pipe
    return _dali_pipe


def _decode_dali_batch(encoded: list[bytes]) -> list[Image.Image]:
    import numpy as np

    with _dali_lock:
        pipe = _get_dali_pipe()
        pipe.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
        (out,) = pipe.run()
        arrays = [np.array(out[i]) for i in range(len(encoded))]  # copies: the pipeline reuses its buffers
    return [Image.fromarray(a, mode="RGB") if a.ndim == 3 else Image.fromarray(a).convert("RGB") for a in arrays]


def decode_images(items: Sequence[bytes | str | os.PathLike]) -> list[Image.Image]:
    """Decode a batch to RGB PIL images, in order. Raises ImageDecodeError naming the first bad item."""
    encoded = [read_image_bytes(item) for item in items]
    if image_backend() != "dali" or not encoded:
        return [_decode_pil(e, item) for e, item in zip(encoded, items)]
    out: list[Image.Image] = []
    for start in range(0, len(encoded), _DALI_BATCH):
        chunk = encoded[start : start + _DALI_BATCH]
        try:
            out.extend(_decode_dali_batch(chunk))
        except Exception:
            # One bad or unsupported image fails the whole DALI batch: redo this chunk one by one so that each
            # image gets DALI where it can and PIL (or a clear error) where it cannot.
            for e, item in zip(chunk, items[start : start + _DALI_BATCH]):
                try:
                    out.extend(_decode_dali_batch([e]))
                except Exception:
                    out.append(_decode_pil(e, item))
    return out


def decode_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode encoded image bytes or an image file to an RGB PIL image (DALI where installed, PIL otherwise)."""
    return decode_images([data])[0]


def bounded_size(width: int, height: int, min_pixels: int, max_pixels: int, factor: int) -> tuple[int, int]:
    """(width, height) closest to this aspect ratio with sides multiples of `factor` and a pixel count within
    [min_pixels, max_pixels] (the rule in the module docstring)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(width, height) / min(width, height) > 200:  # the Qwen2-VL processor refuses these too
        raise ValueError(f"image of {width}x{height} has an aspect ratio over 200, which the vision encoder refuses")
    w, h = round(width / factor) * factor, round(height / factor) * factor
    if w * h > max_pixels:
        shrink = math.sqrt(width * height / max_pixels)
        w = max(factor, math.floor(width / shrink / factor) * factor)
        h = max(factor, math.floor(height / shrink / factor) * factor)
    elif w * h < min_pixels:
        grow = math.sqrt(min_pixels / (width * height))
        w = math.ceil(width * grow / factor) * factor
        h = math.ceil(height * grow / factor) * factor
    return w, h


def resize_to_bounds(image: Image.Image, min_pixels: int, max_pixels: int, factor: int) -> Image.Image:
    """`image` resized (bicubic, as the Qwen2-VL processor resizes) to `bounded_size`; the same object when it
    already has that size."""
    size = bounded_size(image.width, image.height, min_pixels, max_pixels, factor)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)
