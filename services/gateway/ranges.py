"""HTTP ``Range: bytes=...`` for the video download (RFC 9110, section 14). Pure logic, no server.

Why: browsers fetch a video with Range requests (to seek, and to read the MP4 index first) and a
download that broke off resumes with one; a wrong answer here shows as a video that will not play
or seek. One range is served (206); a header that is not a single byte range is ignored, as the RFC
allows, and the whole file is sent (200); a range that starts past the end is 416. A number of more
than ``MAX_DIGITS`` digits is no byte offset of any file: such a header is ignored too (converting it
would cost time, and past 4,300 digits Python refuses to).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_DIGITS = 18                               # 10**18 bytes is an exabyte; int64 holds 18 digits
_SINGLE = re.compile(r"bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.IGNORECASE)


class RangeNotSatisfiable(ValueError):
    """The range lies outside the file; answer 416 with ``Content-Range: bytes */size``."""

    def __init__(self, header: str, size: int) -> None:
        super().__init__(f"the range {header!r} lies outside the video, which has {size} bytes; ask for bytes "
                         f"0-{max(size - 1, 0)}, or send no Range header for the whole video")
        self.size = size


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int             # inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one range to serve of a file of ``size`` bytes; None = send the whole file (no header, or one
    that is not a single valid byte range); RangeNotSatisfiable when it starts past the end."""
    if not header:
        return None
    match = _SINGLE.fullmatch(header.strip())
    if match is None:                         # another unit, several ranges, or garbage: ignore it
        return None
    first, last = match[1], match[2]
    if not first and not last:
        return None
    if len(first) > MAX_DIGITS or len(last) > MAX_DIGITS:
        return None                           # an absurd number: not a byte range of this file, ignored
    if not first:                             # "-N": the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(header, size)
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None                           # syntactically invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable(header, size)
    return ByteRange(start, min(int(last), size - 1) if last else size - 1)
