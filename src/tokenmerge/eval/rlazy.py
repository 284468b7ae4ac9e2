"""R lazy-load databases (``<pkg>/data/Rdata.rdx`` + ``Rdata.rdb``) read without R.

Debian's R data packages (modeldata, janeaustenr, tokenizers) keep their data sets in this
format; ``rdata`` parses the serialised objects.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import warnings
import zlib
from pathlib import Path
from typing import Any

from .zoo import MissingPackageError


def unpack_record(blob: bytes) -> bytes:
    """One record of an R lazy-load database: a 4-byte length, then a compressed payload
    whose first byte names the codec (``Z`` xz, ``2`` bzip2, ``0`` none; else zlib)."""
    kind = blob[4:5]
    if kind == b"Z":
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
        return lzma.decompress(blob[5:], format=lzma.FORMAT_RAW, filters=filters)
    if kind == b"2":
        return bz2.decompress(blob[5:])
    if kind == b"0":
        return blob[5:]
    return zlib.decompress(blob[4:])


def r_object(raw: bytes) -> Any:
    """Deserialise one R object (``rdata``), quietly."""
    try:
        import rdata
    except ImportError as err:
        raise MissingPackageError(
            "The package 'rdata' reads R data files. Install it with: pip install rdata"
        ) from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS", tibble classes
        return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))


def read_lazydata(rdx: Path, rdb: Path) -> dict[str, Any]:
    """Every object of an R lazy-load database, by name."""
    index = r_object(gzip.decompress(rdx.read_bytes()))
    data = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        start = int(offset)
        out[str(name)] = r_object(unpack_record(data[start : start + int(length)]))
    return out
