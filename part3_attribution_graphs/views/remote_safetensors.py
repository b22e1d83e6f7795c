"""Read rows of tensors from a safetensors file on the Hugging Face hub without downloading the file.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte offsets, then the raw tensors, row-major. So row `i` of a tensor of shape (F, K) is the
byte range `[begin + i * K * itemsize, begin + (i + 1) * K * itemsize)`, and its first `k` columns are
the start of that range. `RemoteSafetensors` asks the hub where the file is (its `302` names the storage
URL, the commit and the file's ETag, a hash of its bytes), then fetches the header and exactly those
ranges from storage with HTTP `Range` requests (close ranges merged, several requests at once), and keeps
every fetched range in a small SQLite cache keyed by the ETag: a re-uploaded file, even one with the same
shapes, has a new key. Each cached block is stored with the sha256 of its bytes and checked when it is
read back: a block whose bytes changed on disk is a miss (fetched again) with a warning naming the cache
file. The cache also remembers which ETag each file had, so that with `HF_HUB_OFFLINE` set (read when
called) the ranges read before are served without a single request.

A connection reset in the middle of a body is resumed from the first byte not received (up to
`worlds.hub.MAX_TRIES` times, within the deadline). Each answer is checked before its body is read: a
`200` (a host that ignored `Range`, e.g. because the client accepted gzip) is dropped at the headers,
never downloaded; a `206` must say in `Content-Range` that it holds the bytes asked for, and its body
must have that length. Requests go through
`worlds.hub.hub_request` (retries, deadline, stale token). A cache file that cannot be used is skipped
with a warning naming it.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import math
import re
import sqlite3
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urljoin, urlparse

import torch
from torch import Tensor

from ..worlds import hub as _hub
from ..worlds.hub import HubRequestError, hub_endpoint, hub_offline, hub_request

__all__ = ["RemoteSafetensors", "default_range_cache", "file_url", "parse_header"]

_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
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
_REDIRECTS = (301, 302, 303, 307, 308)


def default_range_cache() -> Path:
    """`~/.cache/part3_attribution_graphs/hub_ranges.sqlite`."""
    return Path.home() / ".cache" / "part3_attribution_graphs" / "hub_ranges.sqlite"


def file_url(repo_id: str, filename: str, revision: str = "main") -> str:
    """The hub URL that resolves `filename` of `repo_id` (to its storage URL, by a redirect)."""
    return f"{hub_endpoint()}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


def parse_header(raw: bytes, data_start: int, size: int | None, name: str) -> dict[str, tuple]:
    """`{tensor: (dtype, shape, begin, end)}` from a safetensors header, every offset checked.

    Raises:
        ValueError: the header is not JSON, or a tensor's bytes do not match its shape and dtype, run past
            the file's end, or overlap another tensor's (the message names the tensor and the file).
    """
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name}: the safetensors header is not JSON ({err}).") from None
    header.pop("__metadata__", None)
    tensors, spans = {}, []
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = (
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                info["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{name}: tensor {key!r} has no dtype, shape or data_offsets.") from None
        if dtype not in _ITEMSIZE:
            raise ValueError(f"{name}: tensor {key!r} has an unknown dtype {dtype!r}.")
        need = math.prod(shape) * _ITEMSIZE[dtype]
        if not 0 <= begin <= end or end - begin != need or min(shape, default=0) < 0:
            raise ValueError(
                f"{name}: tensor {key!r} ({dtype} {list(shape)}) needs {need} bytes but its data_offsets "
                f"[{begin}, {end}] hold {end - begin}: the header is corrupt."
            )
        if size is not None and data_start + end > size:
            raise ValueError(
                f"{name}: tensor {key!r} ends at byte {data_start + end}, past the file's {size}."
            )
        tensors[key] = (dtype, shape, begin, end)
        spans.append((begin, end, key))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ValueError(f"{name}: tensors {a!r} and {b!r} overlap: the header is corrupt.")
    return tensors


class RemoteSafetensors:
    """Rows of the tensors in one safetensors file on the hub, read by HTTP range requests.

    Args:
        repo_id, filename, revision: which file.
        token: sent to the hub as a bearer token (not to its storage host, whose URLs are signed).
        cache: the SQLite file that keeps fetched ranges (default `default_range_cache()`; `False`
            disables it).
        max_workers: requests in flight at once.

    Attributes:
        commit, etag, size: what the hub said the file is. bytes_fetched, requests: what went over the
        network so far (cache hits count nothing).

    Raises:
        HubRequestError: the file could not be read (its `kind` says why).
        ValueError: the file's header is corrupt.
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
        self._file_key = f"{repo_id}/{filename}@{revision}"
        self.token = token
        self.max_workers = max(1, max_workers)
        self.bytes_fetched = 0
        self.requests = 0
        self.commit: str | None = None
        self.etag: str | None = None
        self.size: int | None = None
        self._lock = threading.Lock()
        self._local = (
            threading.local()
        )  # one HTTP session per thread (requests' sessions are not thread-safe)
        self._storage_url: str | None = None  # the signed URL the hub redirected to, used while it works
        self._cache_path = None if cache is False else Path(cache or default_range_cache())
        self._chunks: list[tuple[int, bytes]] = []  # (start, data), sorted by start, disjoint, not touching
        if hub_offline():
            self._recall()
        else:
            self._resolve(time.monotonic() + _hub.REQUEST_DEADLINE_S)
            self._remember()
        self._key = f"etag:{self.etag}" if self.etag else None
        if self._key is None:  # nothing says which version of the file this is: keep nothing on disk
            self._cache_path = None
        self._load_cache()
        (head,) = self.read_ranges([(0, 8)])
        header_len = int.from_bytes(head, "little")
        if not 0 < header_len <= MAX_HEADER or (self.size is not None and 8 + header_len > self.size):
            raise ValueError(f"{self.name} does not start with a safetensors header (length {header_len}).")
        (raw,) = self.read_ranges([(8, 8 + header_len)])
        self._data_start = 8 + header_len
        self.tensors = parse_header(raw, self._data_start, self.size, self.name)

    # ------------------------------------------------------------------------------------- the header
    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key][1]

    # ------------------------------------------------------------------------------------------- rows
    def read_rows(self, key: str, rows: list[int], n_cols: int | None = None) -> Tensor:
        """`tensor[rows]` (first `n_cols` columns only, if given) for a tensor of one or two dimensions."""
        if key not in self.tensors:
            raise ValueError(f"{self.name} has no tensor {key!r}; it has {sorted(self.tensors)}.")
        dtype_name, shape, begin, _ = self.tensors[key]
        if dtype_name not in _DTYPES or len(shape) not in (1, 2):
            raise ValueError(
                f"{self.name}: tensor {key!r} is {dtype_name} {list(shape)}, which is not read here."
            )
        dtype = _DTYPES[dtype_name]
        item = _ITEMSIZE[dtype_name]
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
    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _resolve(self, deadline: float) -> str:
        """The storage URL of the file (asking the hub unless a working one is known); sets commit/etag/size.

        Raises:
            HubRequestError: the hub said no, or the file changed on the hub since the first ask.
        """
        with self._lock:
            if self._storage_url is not None:
                return self._storage_url
        url = self.url
        for _ in range(5):  # same-host redirects (a renamed repository), then the one to storage
            response = hub_request(
                self._session(),
                url,
                headers={"Accept-Encoding": "identity", "Range": "bytes=0-7"},
                token=self.token,
                deadline=deadline,
                what=self.name,
            )
            response.close()  # only the headers are needed
            status, headers = response.status_code, response.headers
            if status in _REDIRECTS and "Location" in headers:
                target = urljoin(url, headers["Location"])
                etag = headers.get("X-Linked-Etag") or headers.get("ETag")
                if urlparse(target).netloc == urlparse(url).netloc and not headers.get("X-Linked-Etag"):
                    url = target
                    continue
                size = headers.get("X-Linked-Size")
                self._learn(headers.get("X-Repo-Commit"), etag, int(size) if size else None)
                with self._lock:
                    self._storage_url = target
                return target
            if status in (200, 206):  # a small file the hub serves itself
                total = re.search(r"/(\d+)$", headers.get("Content-Range", ""))
                size = int(total.group(1)) if total else None
                self._learn(headers.get("X-Repo-Commit"), headers.get("ETag"), size)
                with self._lock:
                    self._storage_url = url
                return url
            raise _refused(url, response)
        raise HubRequestError(f"{self.url}: too many redirects", "unexpected answer")

    def _learn(self, commit: str | None, etag: str | None, size: int | None) -> None:
        etag = etag.strip('"').removeprefix("W/").strip('"') if etag else None
        with self._lock:
            if self.etag is not None and etag is not None and etag != self.etag:
                raise HubRequestError(
                    f"{self.name} changed on the hub while it was being read (ETag {self.etag} -> {etag}, "
                    f"commit {commit}): run again to read the new version.",
                    "unexpected answer",
                )
            self.commit, self.etag = commit or self.commit, etag or self.etag
            self.size = size if size is not None else self.size

    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes `[start, end)` of the file, by HTTP range requests: another if a signed URL expired, and
        the rest of the range again after a connection broke mid-body (resumed, not restarted)."""
        deadline = time.monotonic() + _hub.REQUEST_DEADLINE_S
        got = bytearray()
        refused = breaks = 0
        while True:
            url = self._resolve(deadline)
            at = start + len(got)
            response = hub_request(
                self._session(),
                url,
                headers={"Accept-Encoding": "identity", "Range": f"bytes={at}-{end - 1}"},
                token=self.token if url == self.url else None,  # a signed storage URL refuses a token
                deadline=deadline,
                what=self.name,
            )
            try:
                if response.status_code in (400, 401, 403, 404, 410) and url != self.url:
                    refused += 1
                    if refused >= 3:
                        raise HubRequestError(
                            f"{self.name}: the hub's storage kept refusing its own signed URLs", "forbidden"
                        )
                    with self._lock:  # the signed URL expired: ask the hub for a new one
                        self._storage_url = None
                    continue
                try:
                    got += self._body(response, at, end, deadline)
                except _Broken as err:
                    got += err.partial
                    breaks += 1
                    if breaks >= _hub.MAX_TRIES or time.monotonic() > deadline:
                        raise
                    continue
            finally:
                response.close()
            with self._lock:
                self.bytes_fetched += len(got)
                self.requests += 1 + breaks
            return bytes(got)

    def _body(self, response, start: int, end: int, deadline: float) -> bytes:
        """The asked-for bytes of a 206 answer, checked against `Content-Range`; anything else is refused
        before its body is read.

        Raises:
            _Broken: the connection broke mid-body (`partial`: the asked-for bytes that did arrive).
        """
        url, status = response.url, response.status_code
        if status != 206:
            raise _refused(url, response, start, end)
        found = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if found is None:
            raise HubRequestError(
                f"{url}: a 206 answer without a valid Content-Range", "unexpected answer", 206
            )
        first, last = int(found.group(1)), int(found.group(2))
        if found.group(3) != "*" and self.size is not None and int(found.group(3)) != self.size:
            raise HubRequestError(
                f"{url}: Content-Range says the file has {found.group(3)} bytes, the hub said {self.size}",
                "unexpected answer",
                206,
            )
        if first > start or last < end - 1:
            raise HubRequestError(
                f"{url}: asked for bytes {start}-{end - 1}, the answer holds bytes {first}-{last}",
                "unexpected answer",
                206,
            )
        if response.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
            raise HubRequestError(f"{url}: the range came back encoded", "unexpected answer", 206)
        try:
            data = _read_body(response, last - first + 1, deadline, url)
        except _Broken as err:
            err.partial = err.partial[start - first : end - first]
            raise
        return data[start - first : end - first]

    # ------------------------------------------------------------------------------------------ cache
    def _cached(self, start: int, end: int) -> bytes | None:
        i = bisect.bisect_right(self._chunks, start, key=lambda c: c[0]) - 1
        if i >= 0:
            c_start, data = self._chunks[i]
            if end <= c_start + len(data):
                return data[start - c_start : end - c_start]
        return None

    def _database(self, work):
        """`work(db)` on the cache file; an unusable file is warned about (by name) and not used again."""
        if self._cache_path is None:
            return None
        try:
            self._cache_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(sqlite3.connect(self._cache_path, timeout=60)) as db, db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS blocks (file TEXT, start INTEGER, data BLOB, sha256 TEXT, "
                    "PRIMARY KEY (file, start))"
                )
                db.execute(
                    "CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, etag TEXT, commit_sha TEXT, "
                    "size INTEGER)"
                )
                return work(db)
        except (sqlite3.Error, OSError) as err:
            warnings.warn(
                f"The range cache {self._cache_path} cannot be used ({type(err).__name__}: {err}), so "
                "nothing read now is kept; delete that file (or pass range_cache= another path).",
                UserWarning,
                stacklevel=4,
            )
            self._cache_path = None
            return None

    def _remember(self) -> None:
        """Keep which version of the file the hub named, for reading it offline later."""
        if self.etag:
            self._database(
                lambda db: db.execute(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                    (self._file_key, self.etag, self.commit, self.size),
                )
            )

    def _recall(self) -> None:
        """Offline: the version of the file last read online, from the cache.

        Raises:
            HubRequestError ("offline"): the cache has never seen this file.
        """
        row = self._database(
            lambda db: db.execute(
                "SELECT etag, commit_sha, size FROM files WHERE name = ?", (self._file_key,)
            ).fetchone()
        )
        if not row:
            raise HubRequestError(
                f"{self.name}: HF_HUB_OFFLINE is set and the range cache ({self._cache_path}) has never read "
                "this file",
                "offline",
            )
        self.etag, self.commit, self.size = row

    def _load_cache(self) -> None:
        rows = self._database(
            lambda db: db.execute(
                "SELECT start, data, sha256 FROM blocks WHERE file = ?", (self._key,)
            ).fetchall()
        )
        good = [(start, data) for start, data, digest in rows or [] if _digest(data) == digest]
        if len(good) < len(rows or []):
            warnings.warn(
                f"The range cache {self._cache_path} holds {len(rows) - len(good)} block(s) of {self.name} "
                "whose bytes no longer match their checksum (changed on disk): they are read from the hub "
                "again.",
                UserWarning,
                stacklevel=3,
            )
        self._add(good)

    def _store(self, fetched: list[tuple[int, bytes]]) -> None:
        self._add(fetched)
        self._database(
            lambda db: db.executemany(
                "INSERT OR REPLACE INTO blocks VALUES (?, ?, ?, ?)",
                [(self._key, s, d, _digest(d)) for s, d in fetched],
            )
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


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Broken(HubRequestError):
    """The connection broke mid-body; `partial` holds the bytes that arrived."""

    def __init__(self, message: str, partial: bytes) -> None:
        super().__init__(message, "network")
        self.partial = partial


def _refused(url: str, response, start: int | None = None, end: int | None = None) -> HubRequestError:
    """What a non-206 answer means, read from its headers only."""
    status = response.status_code
    kind_of = response.headers.get("Content-Type", "").split(";")[0]
    if status == 404:
        return HubRequestError(f"{url}: not found (HTTP 404)", "not found", status)
    if status in (401, 403):
        return HubRequestError(f"{url}: access refused (HTTP {status})", "forbidden", status)
    if status == 407:
        return HubRequestError(f"{url}: HTTP 407 from a proxy that wants credentials", "proxy", status)
    if kind_of == "text/html":
        return HubRequestError(
            f"{url}: HTTP {status} with {kind_of or 'a body'} that is not the hub's", "not the hub", status
        )
    if status == 200 and start is not None:
        encoding = response.headers.get("Content-Encoding", "")
        return HubRequestError(
            f"{url} ignored the Range header (HTTP 200{', ' + encoding if encoding else ''}) for bytes "
            f"{start}-{end - 1}: stopped at the headers rather than download the whole file",
            "unexpected answer",
            status,
        )
    return HubRequestError(f"{url}: unexpected HTTP {status}", "unexpected answer", status)


def _read_body(response, n: int, deadline: float, url: str) -> bytes:
    """Exactly `n` bytes of a streamed body, read in pieces so that `deadline` holds even for a trickle."""
    from urllib3.exceptions import HTTPError as Urllib3Error

    raw = response.raw
    read = getattr(raw, "read1", None) or (lambda amt: raw.read(min(amt, 2**14)))
    buf = bytearray()
    while len(buf) < n:
        if time.monotonic() > deadline:
            raise HubRequestError(
                f"{url}: {len(buf)} of {n} bytes arrived before the {_hub.REQUEST_DEADLINE_S:g} s deadline",
                "network",
            )
        try:
            piece = read(min(2**16, n - len(buf)))
        except (OSError, Urllib3Error) as err:
            raise _Broken(
                f"{url}: the connection broke after {len(buf)} of {n} bytes ({err})", bytes(buf)
            ) from err
        if not piece:
            break
        buf += piece
    if len(buf) != n:
        raise _Broken(
            f"{url}: the body ended after {len(buf)} of the {n} bytes Content-Range says", bytes(buf)
        )
    return bytes(buf)
