"""Count, before Pillow opens a file, the steps its Python header parsers would take.

Pillow reads JPEG markers, PNG chunks and GIF extension blocks one Python loop turn at a time, and
a fill byte or a stray byte between JPEG markers is a turn of its own; an uncompressed TIFF is
read strip by strip. A 10 MB upload of 4-byte JPEG comments, 12-byte PNG chunks or 1-byte GIF
comment blocks cost 1.7-6.5 CPU-seconds and up to 650 MB before a single pixel was decoded, and a
12 MB TIFF of 96-byte strips 1.8 CPU-seconds (measured in process). These walks
mirror those loops with the structure's own lengths, stop at the first step over the budget, and
leave every judgement of validity to Pillow: they only count.
"""

from __future__ import annotations

import re

# A budget that grows with the file: real files carry a few dozen segments, plus one PNG IDAT
# chunk per 8 KiB or so (libpng's default); one step per KiB is 8 times that, and still bounds
# Pillow's parsing at a few milliseconds per megabyte.
BASE_STEPS = 1_000
BYTES_PER_STEP = 1_024

_JPEG_SIGNATURE = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
_TIFF_BYTE_ORDERS = {b"II": "little", b"MM": "big"}
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_BIG_TIFF_MAGIC = (b"+\x00", b"\x00+")
_TIFF_COMPRESSION, _TIFF_STRIP_OFFSETS, _TIFF_TILE_OFFSETS = 259, 273, 324
_TIFF_UNCOMPRESSED = 1  # the one compression Pillow reads strip by strip in Python
_JPEG_FILL = re.compile(rb"\xff+")
_JPEG_START_OF_SCAN = 0xDA  # Pillow's JPEG header parse ends here
_JPEG_STANDALONE = {0x00, 0x01, *range(0xD0, 0xDA)}  # markers without a length field


def step_budget(size: int) -> int:
    return BASE_STEPS + size // BYTES_PER_STEP


def header_steps(data: bytes, budget: int) -> int:
    """The parsing steps of a JPEG, PNG or GIF header, counted up to just over `budget`; 0 for
    other formats, whose headers are parsed by their C libraries."""
    if data.startswith(_JPEG_SIGNATURE):
        return _jpeg_steps(data, budget)
    if data.startswith(_PNG_SIGNATURE):
        return _png_steps(data, budget)
    if data.startswith(_GIF_SIGNATURES):
        return _gif_steps(data, budget)
    if data[:4] in _TIFF_SIGNATURES:
        return _tiff_steps(data, budget)
    return 0


def _jpeg_steps(data: bytes, budget: int) -> int:
    """Markers, fill bytes and stray bytes up to the first scan (one Pillow loop turn each)."""
    pos, steps, size = 2, 0, len(data)
    while pos < size and steps <= budget:
        if data[pos] != 0xFF:  # stray bytes: Pillow skips them one by one
            next_marker = data.find(b"\xff", pos)
            if next_marker < 0:
                return steps + size - pos
            steps += next_marker - pos
            pos = next_marker
            continue
        fill_end = _JPEG_FILL.match(data, pos).end()  # 0xFF runs: one turn per extra byte
        steps += fill_end - pos
        if fill_end >= size:
            break
        marker = data[fill_end]
        if marker == _JPEG_START_OF_SCAN:
            break
        if marker in _JPEG_STANDALONE:
            pos = fill_end + 1
        else:
            pos = fill_end + 1 + int.from_bytes(data[fill_end + 1 : fill_end + 3], "big")
    return steps


def _png_steps(data: bytes, budget: int) -> int:
    """Chunks up to IEND, or up to an animated PNG's second frame: Pillow handles every chunk in
    Python, before and after the first frame's pixels."""
    pos, steps, size, seen_pixels = len(_PNG_SIGNATURE), 0, len(data), False
    while pos + 8 <= size and steps <= budget:
        kind = data[pos + 4 : pos + 8]
        if kind == b"IEND" or (kind == b"fcTL" and seen_pixels):
            break
        steps += 1
        seen_pixels = seen_pixels or kind == b"IDAT"
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")  # length, type, data, CRC
    return steps


def _gif_steps(data: bytes, budget: int) -> int:
    """Extension sub-blocks up to the first image descriptor (Pillow reads each in Python; the
    picture's own data blocks are read by its C decoder)."""
    if len(data) < 13:
        return 0
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    steps, size = 0, len(data)
    while pos < size and steps <= budget and data[pos] == 0x21:  # an extension
        pos += 2  # introducer and label
        while pos < size and steps <= budget:
            steps += 1
            block_size = data[pos]
            pos += 1 + block_size
            if block_size == 0:
                break
    return steps


def _tiff_steps(data: bytes, budget: int) -> int:
    """The first directory's entries, plus its strips or tiles when they are uncompressed (Pillow
    makes one Python tile of each; libtiff reads compressed ones in C)."""
    order = _TIFF_BYTE_ORDERS[data[:2]]

    def number(start: int, width: int) -> int:
        return int.from_bytes(data[start : start + width], order)

    # An entry is a tag (2 bytes), a type (2), a value count and a value, 4 bytes each in classic
    # TIFF and 8 in BigTIFF, whose directory also starts with an 8-byte entry count, not 2.
    field, count_width = (8, 8) if data[2:4] in _BIG_TIFF_MAGIC else (4, 2)
    directory = number(field, field)
    entries = number(directory, count_width)
    compression, pieces = _TIFF_UNCOMPRESSED, 0
    for index in range(min(entries, budget + 1)):
        entry = directory + count_width + index * (4 + 2 * field)
        tag = number(entry, 2)
        if tag == _TIFF_COMPRESSION:
            compression = number(entry + 4 + field, 2)
        elif tag in (_TIFF_STRIP_OFFSETS, _TIFF_TILE_OFFSETS):
            pieces = number(entry + 4, field)
    return entries + (pieces if compression == _TIFF_UNCOMPRESSED else 0)
