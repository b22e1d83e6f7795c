"""Read rows of tensors from a safetensors file on the Hugging Face hub without downloading the file.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte offsets, then the raw tensors, row-major. So row `i` of a tensor of shape (F, K) is the
byte range `[begin + i * K * itemsize, begin + (i + 1) * K * itemsize)`, and its first `k` columns are
the start of that range. `RemoteSafetensors` fetches the header and then exactly those ranges, with
HTTP `Range` requests to the file's hub URL (close ranges are merged into one request, and several
requests run at once), and keeps every fetched range in a small SQLite cache, so a second read of the
same rows costs no transfer. The cache is keyed by the file's URL and its header bytes: a file that
changes on the hub gets a new key.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import torch
from torch import Tensor

from ..worlds.hub import hub_endpoint

__all__ = ["RemoteSafetensors", "default_range_cache", "file_url"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MERGE_GAP = 4096  # bytes: two ranges closer than this are fetched as one (a round trip costs more)
MAX_HEADER = 100 * 2**20  # a safetensors header above this is corrupt, not large


def default_range_cache() -> Path:
    """`~/.cache/part3_attribution_graphs/hub_ranges.sqlite`."""
    return Path.home() / ".cache" / "part3_attribution_graphs" / "hub_ranges.sqlite"


def file_url(repo_id: str, filename: str, revision: str = "main") -> str:
    """The hub URL that serves `filename` of `repo_id` (and honours `Range` headers)."""
    return f"{hub_endpoint()}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


class RemoteSafetensors:
    """Rows of the tensors in one safetensors file on the hub, read by HTTP range requests.

    Args:
        repo_id, filename, revision: which file.
        token: sent as a bearer token (None: huggingface_hub's own lookup, e.g. `HF_TOKEN`).
        cache: the SQLite file that keeps fetched ranges (default `default_range_cache()`; None-like
            `False` disables it).
        max_workers: requests in flight at once.

    Attributes:
        bytes_fetched, requests: what went over the network so far (cache hits count nothing).
    """

    def __init__(
        self,
        repo_id: str,
        filename: str,
        revision: str = "main",
        token: str | None = None,
        cache: str | Path | bool | None = None,
        max_workers: int = 8,
    ) -> None:
        self.url = file_url(repo_id, filename, revision)
        self.name = f"{repo_id}/{filename}"
        self.token = token
        self.max_workers = max(1, max_workers)
        self.bytes_fetched = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._local = (
            threading.local()
        )  # one HTTP session per thread (requests' sessions are not thread-safe)
        self._direct_url: str | None = None  # where the hub redirected us (its CDN), reused while it works
        self._cache_path = None if cache is False else Path(cache or default_range_cache())
        self._chunks: list[tuple[int, bytes]] = []  # (start, data), sorted by start, disjoint, not touching
        header_len = int.from_bytes(self._fetch(0, 8), "little")
        if not 0 < header_len <= MAX_HEADER:
            raise ValueError(f"{self.name} does not start with a safetensors header (length {header_len}).")
        raw = self._fetch(8, 8 + header_len)
        header = json.loads(raw.decode("utf-8"))
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self.tensors = {k: (v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()}
        self._key = hashlib.sha256(self.url.split("/", 3)[-1].encode() + raw).hexdigest()[:32]
        self._load_cache()

    # ------------------------------------------------------------------------------------- the header
    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key][1]

    # ------------------------------------------------------------------------------------------- rows
    def read_rows(self, key: str, rows: list[int], n_cols: int | None = None) -> Tensor:
        """`tensor[rows]` (first `n_cols` columns only, if given) for a tensor of one or two dimensions."""
        dtype_name, shape, begin, _ = self.tensors[key]
        dtype = _DTYPES[dtype_name]
        item = torch.empty(0, dtype=dtype).element_size()
        width = shape[1] if len(shape) == 2 else 1
        cols = width if n_cols is None else min(n_cols, width)
        for r in rows:
            if not 0 <= r < shape[0]:
                raise IndexError(f"row {r} of {key} {list(shape)} in {self.name}")
        starts = [self._data_start + begin + r * width * item for r in rows]
        blobs = self.read_ranges([(s, s + cols * item) for s in starts])
        flat = (
            torch.frombuffer(bytearray(b"".join(blobs)), dtype=dtype) if rows else torch.empty(0, dtype=dtype)
        )
        return flat.reshape(len(rows), cols) if len(shape) == 2 else flat.reshape(len(rows))

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each `[start, end)` range: from the cache where it holds them, else fetched."""
        missing = sorted({r for r in ranges if self._cached(*r) is None})
        merged: list[list[int]] = []
        for start, end in missing:
            if merged and start - merged[-1][1] <= MERGE_GAP:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        if merged:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(merged))) as pool:
                fetched = list(pool.map(lambda se: (se[0], self._fetch(*se)), merged))
            self._store(fetched)
        return [self._cached(*r) for r in ranges]

    # ---------------------------------------------------------------------------------------- network
    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes `[start, end)` of the file, over one HTTP range request."""
        import requests
        from huggingface_hub.utils import build_hf_headers

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        range_header = {"Range": f"bytes={start}-{end - 1}"}
        response = None
        if self._direct_url is not None:  # skip the hub's redirect: one round trip instead of two
            response = session.get(self._direct_url, headers=range_header, timeout=30)
            if response.status_code in (401, 403, 404, 410):  # the signed URL expired: ask the hub again
                response = None
        if response is None:
            response = session.get(
                self.url, headers={**build_hf_headers(token=self.token), **range_header}, timeout=30
            )
            if response.history and response.ok:
                self._direct_url = response.url
        response.raise_for_status()
        if response.status_code != 206:
            raise OSError(
                f"{self.url} ignored the Range header (HTTP {response.status_code}); not downloading "
                "the whole file."
            )
        data = response.content
        if len(data) != end - start:
            raise OSError(f"{self.url}: asked for {end - start} bytes at {start}, got {len(data)}.")
        with self._lock:
            self.bytes_fetched += len(data)
            self.requests += 1
        return data

    # ------------------------------------------------------------------------------------------ cache
    def _cached(self, start: int, end: int) -> bytes | None:
        i = bisect.bisect_right(self._chunks, start, key=lambda c: c[0]) - 1
        if i >= 0:
            c_start, data = self._chunks[i]
            if end <= c_start + len(data):
                return data[start - c_start : end - c_start]
        return None

    def _connect(self) -> sqlite3.Connection:
        self._cache_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._cache_path, timeout=60)
        db.execute(
            "CREATE TABLE IF NOT EXISTS chunks (file TEXT, start INTEGER, data BLOB, "
            "PRIMARY KEY (file, start))"
        )
        return db

    def _load_cache(self) -> None:
        if self._cache_path is None:
            return
        with self._connect() as db:
            rows = db.execute("SELECT start, data FROM chunks WHERE file = ?", (self._key,)).fetchall()
        self._add(rows)

    def _store(self, fetched: list[tuple[int, bytes]]) -> None:
        self._add(fetched)
        if self._cache_path is not None:
            with self._connect() as db:
                db.executemany(
                    "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?)", [(self._key, s, d) for s, d in fetched]
                )

    def _add(self, chunks) -> None:
        """Merge chunks into the sorted in-memory list, joining overlapping or touching ones into one."""
        for start, data in chunks:
            end = start + len(data)
            i = bisect.bisect_right(self._chunks, start, key=lambda c: c[0]) - 1
            if i < 0 or self._chunks[i][0] + len(self._chunks[i][1]) < start:
                i += 1
            j = i
            while j < len(self._chunks) and self._chunks[j][0] <= end:
                j += 1
            group = [*self._chunks[i:j], (start, data)]
            lo = min(c[0] for c in group)
            buf = bytearray(max(c[0] + len(c[1]) for c in group) - lo)
            for c_start, c_data in group:  # all slices of one file, so overlaps agree
                buf[c_start - lo : c_start - lo + len(c_data)] = c_data
            self._chunks[i:j] = [(lo, bytes(buf))]
