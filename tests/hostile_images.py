"""Hand-built image files for the image-robustness tests."""

import struct
import zlib


def png_header_only(width: int, height: int) -> bytes:
    """A PNG announcing `width x height` 8-bit greyscale pixels with no pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
