"""Image grids and a dependency-free PNG writer (8-bit greyscale or RGB)."""
import struct
import zlib

import numpy as np

from mri.data.io import atomic_path


def to_uint8(images, lo=-1.0, hi=1.0):
    """Map floats in [lo, hi] to 0..255 (clipped)."""
    x = (np.asarray(images, np.float32) - lo) / (hi - lo)
    return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def picture(image):
    """One (S, S, C) image as a PNG cell: (S, S) for one channel, (S, S, 3) RGB for three (other channel counts:
    their mean, grey)."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image
    return image if image.shape[-1] == 3 else image.mean(-1)


def diverging(diff, scale):
    """Signed difference map to RGB: loss blue, gain red, zero white; |diff| >= scale saturates."""
    t = np.clip(np.asarray(diff, np.float32) / scale, -1.0, 1.0)
    rgb = np.ones(t.shape + (3,), np.float32)
    rgb[..., 0] -= np.clip(-t, 0, 1)
    rgb[..., 1] -= np.abs(t)
    rgb[..., 2] -= np.clip(t, 0, 1)
    return np.round(rgb * 255).astype(np.uint8)


def tile(cells, pad=2, fill=255):
    """Arrange a 2D list (rows of equally sized uint8 cells, grey HxW or RGB HxWx3) into one image."""
    cells = [[np.asarray(c) for c in row] for row in cells]
    rgb = any(c.ndim == 3 for row in cells for c in row)
    h, w = cells[0][0].shape[:2]
    n_rows, n_cols = len(cells), max(len(r) for r in cells)
    shape = (n_rows * (h + pad) + pad, n_cols * (w + pad) + pad) + ((3,) if rgb else ())
    out = np.full(shape, fill, np.uint8)
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            if rgb and c.ndim == 2:
                c = np.repeat(c[..., None], 3, axis=-1)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = c
    return out


def _chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(image):
    """Encode a uint8 array (H, W) or (H, W, 3) as PNG."""
    image = np.ascontiguousarray(image, np.uint8)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"PNG needs (H, W) or (H, W, 3) uint8, got shape {image.shape}")
    h, w = image.shape[:2]
    colour = 0 if image.ndim == 2 else 2
    rows = image.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def write_png(path, image):
    """Write a PNG atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(png_bytes(image))


def read_png_size(path):
    """(height, width) from a PNG header, for tests and reports."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    w, h = struct.unpack(">II", head[16:24])
    return h, w
