"""Image decoding: PIL fallback behaviour everywhere; DALI vs PIL pixels where DALI is installed."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from mssr_megatron.data import images as img_mod
from mssr_megatron.data.images import ImageDecodeError, decode_image, decode_images, image_size, set_image_backend
from mssr_megatron.data.synthetic import make_scene, render

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except Exception:
    HAVE_DALI = False

needs_dali = pytest.mark.skipif(
    not HAVE_DALI, reason="NVIDIA DALI is not installed (optional: pip install nvidia-dali-cuda120); PIL path only"
)

# Both backends use libjpeg-turbo's default (islow) IDCT here and agreed bit for bit (DALI 2.4.0, Pillow 13);
# other builds may use another IDCT, which differs by a few levels at most: that is the tolerance.
JPEG_MAX_ABS = 4
JPEG_MEAN_ABS = 0.5


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _test_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    smooth = np.stack([(xx * 2) % 256, (yy * 2) % 256, (xx + yy) % 256], -1)
    return {
        "smooth": smooth.astype(np.uint8),
        "noise": rng.integers(0, 256, (45, 67, 3), dtype=np.uint8),  # odd sizes: chroma subsampling edges
        "scene": np.asarray(render(make_scene(random.Random(3), "count", 3))),
    }


@pytest.fixture
def pil_backend():
    set_image_backend("pil")
    yield
    set_image_backend(None)


def test_pil_decodes_modes_to_rgb(pil_backend):
    base = Image.fromarray(_test_arrays()["smooth"])
    for mode in ("RGB", "L", "P", "RGBA", "LA"):
        out = decode_image(_encode(base.convert(mode), "PNG"))
        assert out.mode == "RGB" and out.size == base.size
        assert np.array_equal(np.asarray(out), np.asarray(base.convert(mode).convert("RGB")))


def test_paths_and_batches(pil_backend, tmp_path):
    base = Image.fromarray(_test_arrays()["noise"])
    path = tmp_path / "a.png"
    base.save(path)
    a, b = decode_images([str(path), _encode(base, "PNG")])
    assert np.array_equal(np.asarray(a), np.asarray(base)) and np.array_equal(np.asarray(b), np.asarray(base))
    assert image_size(str(path)) == base.size == image_size(path.read_bytes())


def test_bad_data_raises_clear_error(pil_backend, tmp_path):
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        decode_image(b"definitely not an image")
    with pytest.raises(ImageDecodeError, match="cannot read image file"):
        decode_image(str(tmp_path / "missing.png"))
    png = _encode(Image.fromarray(_test_arrays()["noise"]), "PNG")
    with pytest.raises(ImageDecodeError):
        decode_image(png[: len(png) // 2])  # truncated
    with pytest.raises(ImageDecodeError, match="no such image file"):
        image_size(str(tmp_path / "missing.png"))
    with pytest.raises(ImageDecodeError):
        image_size(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


def _exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    base = Image.fromarray(_test_arrays()["smooth"])  # 120 x 90
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _encode(base, "JPEG", quality=95, exif=exif.tobytes()), base


def test_exif_orientation_applied(pil_backend):
    data, _ = _exif_rotated_jpeg()
    out = decode_image(data)
    assert out.size == (90, 120) == image_size(data)


def test_backend_name():
    assert img_mod.image_backend() == ("dali" if HAVE_DALI else "pil")
    set_image_backend("pil")
    try:
        assert img_mod.image_backend() == "pil"
    finally:
        set_image_backend(None)


def _both(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    set_image_backend("pil")
    try:
        pil = np.asarray(decode_image(data)).astype(np.int16)
    finally:
        set_image_backend("dali")
    try:
        dali = np.asarray(img_mod._decode_dali_batch([data])[0]).astype(np.int16)  # DALI itself, no fallback
    finally:
        set_image_backend(None)
    return pil, dali


@needs_dali
def test_dali_png_exact():
    for name, arr in _test_arrays().items():
        for mode in ("RGB", "L", "P", "RGBA"):
            pil, dali = _both(_encode(Image.fromarray(arr).convert(mode), "PNG"))
            assert np.array_equal(pil, dali), (name, mode)


@needs_dali
def test_dali_jpeg_within_tolerance():
    for name, arr in _test_arrays().items():
        for quality, subsampling in ((75, 2), (95, 0)):
            pil, dali = _both(_encode(Image.fromarray(arr), "JPEG", quality=quality, subsampling=subsampling))
            assert pil.shape == dali.shape
            diff = np.abs(pil - dali)
            assert diff.max() <= JPEG_MAX_ABS and diff.mean() <= JPEG_MEAN_ABS, (name, quality, diff.max())


@needs_dali
def test_dali_exif_and_fallbacks():
    data, _ = _exif_rotated_jpeg()
    pil, dali = _both(data)
    assert pil.shape == dali.shape == (120, 90, 3)
    assert np.abs(pil - dali).max() <= JPEG_MAX_ABS
    gif = _encode(Image.fromarray(_test_arrays()["noise"]).convert("P"), "GIF")  # DALI rejects GIF: PIL takes it
    assert decode_image(gif).size == (67, 45)
    png = _encode(Image.fromarray(_test_arrays()["noise"]), "PNG")
    good, = decode_images([png])
    with pytest.raises(ImageDecodeError):
        decode_images([png, b"garbage", png])
    assert np.array_equal(np.asarray(decode_images([png])[0]), np.asarray(good))  # the pipeline still works
