"""A few frames as one PNG, written with zlib: the denoiser's live previews (services/denoiser/server.py).

Why not Pillow: it is not a dependency of the services (pyproject.toml), and an 8-bit RGB PNG is a
signature, three chunks and a zlib stream (RFC 2083), a dozen lines.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray, level: int = 6) -> bytes:
    """uint8 [H, W, 3] -> the bytes of an 8-bit RGB PNG (no interlace, filter 0 on every row)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"a PNG is made of uint8 [H, W, 3] pixels, not {rgb.dtype} {list(rgb.shape)}")
    height, width, _ = rgb.shape
    rows = np.zeros((height, 1 + width * 3), dtype=np.uint8)      # each row: its filter byte (0), then RGB
    rows[:, 1:] = rgb.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) \
        + _chunk(b"IEND", b"")


def grid_shape(frames: int) -> tuple[int, int]:
    """(columns, rows) of the grid of ``frames`` frames: as square as it gets, rows filled first."""
    columns = max(1, math.ceil(math.sqrt(frames)))
    return columns, max(1, math.ceil(frames / columns))


def frame_grid(frames: np.ndarray) -> tuple[np.ndarray, int, int]:
    """uint8 [F, h, w, 3] -> ([rows * h, columns * w, 3], columns, rows): frame i at column i % columns, row
    i // columns; cells past the last frame are black."""
    count, height, width, _ = frames.shape
    columns, rows = grid_shape(count)
    cells = np.zeros((rows * columns, height, width, 3), dtype=np.uint8)
    cells[:count] = frames
    picture = cells.reshape(rows, columns, height, width, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(picture.reshape(rows * height, columns * width, 3)), columns, rows
