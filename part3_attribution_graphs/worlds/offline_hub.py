"""A loopback Hugging Face hub that behaves like the real one, to test the hub path offline.

What the real hub and the installed libraries do (read in huggingface_hub 0.36 `file_download.py`,
`utils/_http.py`, `utils/_auth.py`, `utils/_xet.py`; SAELens 6.54 `loading/pretrained_sae_loaders.py`;
requests 2.3x `sessions.py`), and what `offline_hub` does for each (the numbers are issue 19's rows):

1. `GET /{repo}/resolve/{rev}/{file}` of a large (LFS/Xet) file answers `302` to a storage host on
   another domain (a CDN or `cas-bridge.xethub.hf.co`) with a signed URL. `requests` sends
   `Accept-Encoding: gzip, deflate` by default, and a CDN may then compress the answer and ignore
   `Range`, sending the whole file with `200`. huggingface_hub sends `Accept-Encoding: identity` for
   exactly this reason. Here: with `ignore_range_under_gzip`, the storage host answers a request that
   accepts gzip with the whole file, gzipped, `200`, and counts what it managed to send.
2. That `302` carries `X-Repo-Commit` (the commit `rev` resolved to), `X-Linked-Etag` (the file's
   sha256, quoted) and `X-Linked-Size`; huggingface_hub keys its cache by them. Files are re-uploaded
   with the same names and shapes. Here: every file has a sha256 ETag, every repository a history of
   commits, and `reupload` writes new bytes under a new commit on `main`, while the older commits (asked
   by sha) and old signed URLs keep serving the old bytes (storage is addressed by content).
3. The hub rate-limits `/resolve/` and `/api/` per IP or token in fixed 5-minute windows (hub-docs
   `rate-limits.md`) and says so in IETF draft headers: `RateLimit: "api";r=0;t=N` (none left, the
   window resets in N s) and `RateLimit-Policy: "fixed window";"api";q=500;w=300`. huggingface_hub 2.x's
   `http_backoff` retries 408/429/5xx up to 5 times and, on a 429 with `r=0`, sleeps `t + 1` s (else
   `Retry-After`, else 1, 2, 4, 8 s); 0.36's retries only 5xx and dropped connections, so there
   `hf_hub_download` fails on one 429. SAELens' `_get_with_rate_limit_retry` retries 429. Here:
   `rate_limit(n, window_s)` answers the next `n` hub requests with `429` and those two headers
   (`retry_after=` adds a `Retry-After`, which some proxies send instead).
4. huggingface_hub's `get_token` reads a Colab secret `HF_TOKEN`, then `HF_TOKEN` /
   `HUGGING_FACE_HUB_TOKEN`, then the `hf auth login` file (`HF_TOKEN_PATH`). The hub answers `401`
   to a token it does not know even for a public repository. Here: with `valid_tokens` set, a bearer
   token outside it gets `401` (`Invalid credentials in Authorization header`).
5. GemmaScope 2's `examples.safetensors` is not documented; `real_example_schema` writes what the
   issue found: int64 `seq_ids`, int32 `positions`, float64 `feature_frequencies`, `tokens` of shape
   (N, 256), K = 1000 examples, and an extra `logit_effects`.
6. A missing file is `404` with `X-Error-Code: EntryNotFound` (huggingface_hub raises
   `EntryNotFoundError`); a repository that does not exist (or is private) is `401` with
   `X-Error-Code: RepoNotFound`. Here: the same, from the folder.
7. SAELens' `get_safetensors_tensor_shapes` sends its own `requests.get` with `Range` (bytes 0-7,
   then the header) on every `SAE.from_pretrained`, cached or not, and ignores `HF_HUB_OFFLINE`.
   Here: nothing of SAELens is substituted; its header read is served like any other request.
8. GemmaScope 2 is stored on Xet: the `/resolve/` answer also carries `X-Xet-Hash` and a
   `X-Xet-Refresh-Route`; with `hf_xet` installed huggingface_hub asks that route for a CAS token and
   raises `ValueError` when the answer is not what it expects. Here: with `xet_broken`, the route
   answers without the Xet headers.
9. A captive portal answers every URL with its own HTML page (`200`), a proxy with `403`/`407`. Here:
   `captive="page"` or `captive="407"` makes the hub endpoint do that.
10. A `206` says in `Content-Range` which bytes it holds. Here: `range_shift` answers `206` with bytes
    from another offset (and says so in `Content-Range`), for ranges from `range_shift_from` on.
11. Here: `trickle_s` sends bodies (the hub's own files and storage's) one byte per `trickle_s` seconds, so
    no read timeout fires and only a wall-clock deadline ends the transfer.
12. (the client's cache file; nothing to serve)
13. The hub and its CDN answer `500`/`502`/`503`/`504` in outages (huggingface_hub retries them, 5 tries,
    waits 1-8 s). Here: `server_errors(n, status)` answers the next `n` hub requests with `status`.
14. A CDN connection can be reset in the middle of a body (a TCP RST after some bytes). Here:
    `reset_mid_body(n, after)` cuts the next `n` storage bodies after `after` bytes with a reset.
15. A network that intercepts HTTPS, or a wrong clock, makes the TLS handshake fail (`ssl.SSLError`
    under the client's connection error). Here: `tls_endpoint` is the hub's port spoken to over
    `https://`, which fails the handshake as an intercepting box does.
16. A proxy that wants credentials answers `407` (to a `CONNECT` for HTTPS, to the request itself for
    HTTP). Here: `proxy` is the URL of a proxy that answers every request `407` (set it as
    `HTTP_PROXY`/`HTTPS_PROXY`).
17. The Xet path of a normal download (huggingface_hub 0.36 `file_download.py` `xet_get` and
    `utils/_xet.py`, 2.x the same; hf_xet 1.8, whose requests were watched against this server; xet-core
    `spec/api.md`, `download_protocol.md`, `xorb.md`). With hf_xet installed and `X-Xet-Hash` on the
    `/resolve/` answer, huggingface_hub GETs `X-Xet-Refresh-Route` (`/api/models/{repo}/xet-read-token/
    {rev}`) for `X-Xet-Cas-Url`, `X-Xet-Access-Token` and `X-Xet-Token-Expiration` and calls
    `hf_xet.download_files`. hf_xet asks the CAS `GET /v2/reconstructions/{file_hash}`, on a 404
    `GET /v1/reconstructions/{file_hash}` (bearer token, `Range: bytes=0-{size-1}`) for
    `{offset_into_first_range, terms: [{hash, unpacked_length, range}], fetch_info: {xorb: [{range, url,
    url_range}]}}`, GETs each presigned xorb `url` with `Range: bytes={url_range}` (no token), decodes
    the xorb (per chunk an 8-byte header: version 0, compressed size u24 LE, scheme 0 none / 1 LZ4 /
    2 byte-grouped LZ4, uncompressed size u24 LE; then the data), writes the file, and POSTs
    `/v1/telemetry` to the CAS. Its failures surface as `RuntimeError: Data processing error: CAS
    service error ...`. Here: with `xet`, the storage host is also the CAS: it answers `/v1/`
    reconstructions (with `Range`; 401 to another token, 404 to an unknown file, 416 past the end) and
    serves xorbs at signed, expiring URLs that need `Range` (403 without, as the spec says), under the
    knobs of rows 10, 11 and 14; `/v2/` answers 404, so hf_xet takes the documented v1 API. Unlike the
    real CAS: the file hash is the file's sha256 (the real one is a Merkle hash of its chunks; a download
    only names it, never recomputes it), chunks are cut every 64 KiB (the real ones by content, 8-128
    KiB) and stored uncompressed (scheme 0, which the spec allows for any chunk), and there is no
    deduplication across files, no v2 reconstruction and no upload API (xorbs are made here from the
    folder's files, `OfflineHub.xorbs`). `xet_broken` (row 8) keeps the broken token route.

18. Revisions (huggingface_hub 0.36 and 2.x `hf_api.py` `model_info`, `file_download.py`
    `hf_hub_download`, `_get_metadata_or_catch_error`, `_cache_commit_hash_for_specific_revision`):
    `HfApi.model_info(repo, revision=rev)` is `GET /api/models/{repo}/revision/{quote(rev, safe="")}`,
    whose JSON names the commit as `sha`; an unknown revision is `404` with `X-Error-Code:
    RevisionNotFound` (huggingface_hub raises `RevisionNotFoundError`). `hf_hub_download(revision=rev)`
    sends `HEAD /{repo}/resolve/{rev}/{file}` and reads the commit from `X-Repo-Commit` (with the ETag and
    size of row 2; 2.x follows redirects only on the hub's own origin, the `302` to storage carries them);
    it keeps the file under `snapshots/{commit}/` and, when `rev` is not itself a commit, writes the
    commit to `refs/{rev}`. Here: `/api/models/{repo}/revision/{rev}` and `/resolve/{rev}/` answer `main`
    with the newest commit and a sha of the repository's history with that commit's files
    (`OfflineHub.commit`, `OfflineHub.file_at`), anything else `404 RevisionNotFound`.

How it is reached: through the supported door only. `offline_hub` sets `HF_ENDPOINT`, `HF_HUB_CACHE`
and `HF_HUB_OFFLINE=0` in the environment for the block; this package reads them when it calls
(`worlds.hub.hub_endpoint`, `hub_cache_dir`, `hub_offline`) and passes `endpoint=` and `cache_dir=` to
`hf_hub_download`, so any installed huggingface_hub version is reached without touching its internals.
Code that calls huggingface_hub without those arguments (SAELens' own loader, transformers) reads
`HF_ENDPOINT` only at huggingface_hub's import: run it in a subprocess started inside the block.

The storage host (a second loopback server, another origin) rejects any `Authorization` header with
`400` (a signed URL carries its own authentication, as S3/CloudFront do) and answers `403` once a
signed URL has expired (`expire_signed_urls()`, or after `url_lifetime_s`). `bytes_sent` counts the
body bytes both servers wrote. `write_gemmascope_layout` writes transcoders, with a `config.json` as
GemmaScope 2 has them, and `write_example_files` example data, in the repositories' layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..replacement import Transcoder

__all__ = [
    "write_gemmascope_layout",
    "write_example_files",
    "real_example_schema",
    "offline_hub",
    "OfflineHub",
    "GEMMASCOPE_REPO",
]

GEMMASCOPE_REPO = "google/gemma-scope-2-1b-it"
# Stored in LFS/Xet, so /resolve/ redirects to storage; any other file is a git file the hub serves itself.
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
_CHUNK = 64 * 1024  # Xet's target chunk size (its chunks are 8-128 KiB, cut by content; any cut reads back)
_XORB_CHUNKS = 1024  # chunks per xorb: Xet's xorbs hold about 64 MiB


def write_gemmascope_layout(
    transcoders: dict[int, Transcoder],
    root: str | Path,
    repo_id: str = GEMMASCOPE_REPO,
    width: str = "16k",
    l0: str = "small",
) -> list[Path]:
    """Write transcoders in GemmaScope 2's hub layout under `root/repo_id/` (`params.safetensors` and
    `config.json` per layer); returns the params files written."""
    written = []
    model_name = repo_id.replace("gemma-scope-2", "gemma-3")
    for layer, tc in transcoders.items():
        folder = Path(root) / repo_id / "transcoder_all" / f"layer_{layer}_width_{width}_l0_{l0}_affine"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "w_enc": tc.W_enc,
            "w_dec": tc.W_dec,
            "b_enc": tc.b_enc,
            "b_dec": tc.b_dec,
            "threshold": tc.threshold,
            "affine_skip_connection": tc.W_skip.T,  # the hub keeps (d_in, d_out)
        }
        path = folder / "params.safetensors"
        save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(path))
        config = {
            "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
            "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
            "width": int(tc.W_enc.shape[1]),
            "model_name": model_name,
            "architecture": "jump_relu",
            "l0": 12,
            "affine_connection": True,
            "type": "transcoder",
        }
        (folder / "config.json").write_text(json.dumps(config))
        written.append(path)
    return written


def write_example_files(
    example_data_by_layer: dict[int, dict[str, Tensor]],
    root: str | Path,
    repo_id: str = GEMMASCOPE_REPO,
    width: str = "16k",
    l0: str = "small",
    affine: bool = True,
) -> list[Path]:
    """Write example data (GemmaScope 2's `examples.safetensors` keys) beside the transcoders' folders."""
    from ..views.examples import example_file_path

    written = []
    for layer, data in example_data_by_layer.items():
        path = Path(root) / repo_id / example_file_path(layer, "transcoder_all", width, l0, affine)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in data.items()}, str(path))
        written.append(path)
    return written


def real_example_schema(
    n_features: int, n_sequences: int, k: int = 1000, seq_len: int = 256, seed: int = 0
) -> dict[str, Tensor]:
    """Random example data in the dtypes and shapes of GemmaScope 2's files (see row 5 above)."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.rand(n_features, k, generator=gen).sort(dim=1, descending=True).values
    acts[:, k // 2 :] = 0.0
    seq = torch.randint(n_sequences, (n_features, k), generator=gen, dtype=torch.int64)
    return {
        "activations": acts,
        "seq_ids": torch.where(acts > 0, seq, -1),
        "positions": torch.randint(seq_len, (n_features, k), generator=gen, dtype=torch.int32),
        "feature_frequencies": torch.rand(n_features, generator=gen, dtype=torch.float64),
        "top_tokens": torch.randint(262144, (n_features, 10), generator=gen, dtype=torch.int32),
        "top_logits": torch.randn(n_features, 10, generator=gen),
        "bottom_tokens": torch.randint(262144, (n_features, 10), generator=gen, dtype=torch.int32),
        "bottom_logits": torch.randn(n_features, 10, generator=gen),
        "logit_effects": torch.randn(n_features, 20, generator=gen),
        "tokens": torch.randint(262144, (n_sequences, seq_len), generator=gen, dtype=torch.int32),
    }


@dataclass
class OfflineHub:
    """The folder served as the hub, its loopback URLs, what they sent, and the knobs of the rows above."""

    root: Path
    endpoint: str = ""
    storage: str = ""
    bytes_sent: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header or "")
    storage_saw_authorization: int = 0
    ignore_range_under_gzip: bool = False
    valid_tokens: set[str] | None = None  # None: any token is accepted
    captive: str | None = None  # "page", "403" or "407"
    xet_broken: bool = False
    xet: bool = False  # row 17: stored files are advertised as Xet, and the CAS serves them
    xet_token: str = "xet-read-token-0"
    range_shift: int = 0
    range_shift_from: int = 0  # only ranges starting here or later are shifted
    trickle_s: float = 0.0
    url_lifetime_s: float = 3600.0
    retry_after: str | None = None
    window_s: int = 300
    error_status: int = 503
    reset_after: int = 0
    tls_endpoint: str = ""
    proxy: str = ""
    _rate_limited: int = 0
    _server_errors: int = 0
    _resets: int = 0
    _generation: int = 0
    _log: dict[str, list[str]] = field(default_factory=dict)  # repo -> its commits, oldest first
    _changes: dict[str, list[tuple[int, str, Path]]] = field(default_factory=dict)  # (commit, file, before)
    _blobs: dict[str, Path] = field(default_factory=dict)  # sha256 -> file holding those bytes
    _etags: dict[tuple[str, int, int], str] = field(default_factory=dict)
    _xorbs: dict[str, list[tuple[str, list[int]]]] = field(default_factory=dict)  # file -> (xorb, chunk ends)
    stop: threading.Event = field(default_factory=threading.Event, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rate_limit(self, n: int, window_s: int = 300, retry_after: str | None = None) -> None:
        """Answer the next `n` requests to the hub (not the storage host) with 429, `RateLimit` saying the
        window resets in `window_s` s (row 3)."""
        with self.lock:
            self._rate_limited, self.window_s, self.retry_after = n, window_s, retry_after

    def server_errors(self, n: int, status: int = 503) -> None:
        """Answer the next `n` requests to the hub with `status` (row 13)."""
        with self.lock:
            self._server_errors, self.error_status = n, status

    def reset_mid_body(self, n: int, after: int = 100) -> None:
        """Cut the next `n` storage bodies after `after` bytes with a TCP reset (row 14)."""
        with self.lock:
            self._resets, self.reset_after = n, after

    def expire_signed_urls(self) -> None:
        """Every storage URL handed out so far answers 403 from now on."""
        with self.lock:
            self._generation += 1

    def commit(self, repo_id: str, revision: str = "main") -> str | None:
        """The commit sha `revision` names (`main`: the newest; a sha: itself if it is one of the
        repository's), else None."""
        with self.lock:
            log = self._log.setdefault(repo_id, [hashlib.sha1(repo_id.encode()).hexdigest()])
            if revision == "main":
                return log[-1]
            return revision if revision in log else None

    def file_at(self, repo_id: str, commit: str, filename: str) -> Path:
        """The file holding `filename` as it was at `commit`: the bytes a later re-upload replaced, if one
        did, else the folder's file."""
        with self.lock:
            at = self._log[repo_id].index(commit)
            for changed_in, name, before in self._changes.get(repo_id, []):
                if name == filename and changed_in > at:  # the first change after `commit` kept its bytes
                    return before
        return self.root / repo_id / filename

    def reupload(self, repo_id: str, filename: str, tensors: dict[str, Tensor]) -> None:
        """Replace a file by new tensors under a new commit on `main`; the older commits keep serving the
        old bytes (at their sha), and so do old signed URLs."""
        path = self.root / repo_id / filename
        old = self.etag(path)
        keep = self.root / ".blobs" / old
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, keep)
        before = self.commit(repo_id)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        with self.lock:
            self._blobs[old] = keep
            log = self._log[repo_id]
            self._changes.setdefault(repo_id, []).append((len(log), filename, keep))
            log.append(hashlib.sha1((before + filename).encode()).hexdigest())

    def etag(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self.lock:
            known = self._etags.get(key)
        if known is None:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(2**20), b""):
                    digest.update(block)
            known = digest.hexdigest()
            with self.lock:
                self._etags[key] = known
                self._blobs.setdefault(known, path)
        return known

    def xorbs(self, file_hash: str) -> list[tuple[str, list[int]]]:
        """The file `file_hash` (its sha256 here) as Xet stores it: chunks of at most `_CHUNK` bytes, stored
        uncompressed (scheme 0) in xorbs of at most `_XORB_CHUNKS` chunks, each written to `.xorbs/` and
        served by the storage host like a blob. Returns, per xorb in file order, its hash and the end of
        each of its chunks in the xorb's serialized bytes."""
        with self.lock:
            known, source = self._xorbs.get(file_hash), self._blobs.get(file_hash)
        if known is not None or source is None:
            return known or []
        layout = []
        with open(source, "rb") as f:
            while True:
                chunks: list[bytes] = []
                for _ in range(_XORB_CHUNKS):
                    chunk = f.read(_CHUNK)
                    if not chunk:
                        break
                    chunks.append(chunk)
                if not chunks:
                    break
                serialized, ends = bytearray(), []
                for chunk in chunks:  # version 0, compressed size, scheme 0 (none), uncompressed size
                    n = len(chunk).to_bytes(3, "little")
                    serialized += bytes([0]) + n + bytes([0]) + n + chunk
                    ends.append(len(serialized))
                xorb_hash = hashlib.sha256(b"xorb" + bytes(serialized)).hexdigest()
                path = self.root / ".xorbs" / xorb_hash
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(serialized)
                layout.append((xorb_hash, ends))
                with self.lock:
                    self._blobs[xorb_hash] = path
        with self.lock:
            self._xorbs[file_hash] = layout
        return layout

    def _take(self, counter: str) -> bool:
        with self.lock:
            if getattr(self, counter) > 0:
                setattr(self, counter, getattr(self, counter) - 1)
                return True
        return False

    def _count(self, n: int) -> None:
        with self.lock:
            self.bytes_sent += n


class _Base(BaseHTTPRequestHandler):
    hub: OfflineHub
    storage_host = False  # row 14's resets cut storage bodies only

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        raise NotImplementedError

    def _reply(self, status: int, data: bytes, body: bool, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.hub._count(len(data))
        except OSError:  # the client stopped reading: what it did not take was not sent
            pass

    def _send_file(self, path: Path, body: bool, headers: dict[str, str]) -> None:
        """Serve a file honouring `Range` (or not, under rows 1, 10 and 11)."""
        hub = self.hub
        size = path.stat().st_size
        gzip_ok = "gzip" in self.headers.get("Accept-Encoding", "")
        ranged = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if hub.ignore_range_under_gzip and gzip_ok:
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Encoding", "gzip")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            if body:
                squeeze = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip framing
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(2**16), b""):
                        if hub.stop.is_set():
                            return
                        try:
                            chunk = squeeze.compress(block)
                            self.wfile.write(chunk)
                        except OSError:
                            return
                        hub._count(len(chunk))
                self._write(squeeze.flush())
            return
        start, end, status = 0, size - 1, 200
        if ranged:
            start = int(ranged.group(1))
            end = min(int(ranged.group(2) or size - 1), size - 1)
            status = 206
            if start > end:
                self._reply(416, b"", body, {"Content-Range": f"bytes */{size}"})
                return
            shift = max(-start, min(hub.range_shift, size - 1 - end)) if start >= hub.range_shift_from else 0
            start, end = start + shift, end + shift
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1) if body else b""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        if self.storage_host and len(data) > hub.reset_after and hub._take("_resets"):
            self._write(data[: hub.reset_after])
            self.wfile.flush()
            # SO_LINGER 0: close() sends a TCP RST, as a dropped CDN connection does
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if hub.trickle_s > 0:
            for i in range(len(data)):
                if hub.stop.wait(hub.trickle_s):
                    return
                self._write(data[i : i + 1])
            return
        self._write(data)


class _HubHandler(_Base):
    def _serve(self, body: bool) -> None:
        hub = self.hub
        with hub.lock:
            hub.requests.append((self.path, self.headers.get("Range", "")))
        if hub.captive == "page":
            page = b"<html><body>Sign in to the guest network to continue.</body></html>"
            self._reply(200, page, body, {"Content-Type": "text/html"})
            return
        if hub.captive in ("403", "407"):
            self._reply(int(hub.captive), b"<html>Proxy authentication required</html>", body)
            return
        if hub._take("_rate_limited"):
            headers = {
                "RateLimit": f'"api";r=0;t={hub.window_s}',
                "RateLimit-Policy": '"fixed window";"api";q=500;w=300',
            }
            if hub.retry_after is not None:
                headers["Retry-After"] = hub.retry_after
            self._reply(429, b"Too Many Requests", body, headers)
            return
        if hub._take("_server_errors"):
            self._reply(
                hub.error_status, b"<html>Service Unavailable</html>", body, {"Content-Type": "text/html"}
            )
            return
        auth = self.headers.get("Authorization", "")
        if auth and hub.valid_tokens is not None and auth.removeprefix("Bearer ") not in hub.valid_tokens:
            error = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
            self._reply(401, error, body, {"Content-Type": "application/json"})
            return
        path = unquote(urlparse(self.path).path)
        if "/xet-read-token/" in path:
            if hub.xet_broken:  # row 8: a CAS token route that does not give one
                self._reply(200, b"{}", body, {"Content-Type": "application/json"})
                return
            expires = int(time.time() + hub.url_lifetime_s)  # row 17: the CAS URL and a read token for it
            answer = {"casUrl": hub.storage, "accessToken": hub.xet_token, "exp": expires}
            self._reply(
                200,
                json.dumps(answer).encode(),
                body,
                {
                    "Content-Type": "application/json",
                    "X-Xet-Cas-Url": hub.storage,
                    "X-Xet-Access-Token": hub.xet_token,
                    "X-Xet-Token-Expiration": str(expires),
                },
            )
            return
        api = re.match(r"^/api/models/(.+?)(?:/revision/([^/]+))?$", path)
        if api:
            self._repo_info(api.group(1), api.group(2) or "main", body)
            return
        resolve = re.match(r"^/(.+?)/resolve/([^/]+)/(.+)$", path)
        if resolve is None:
            self._reply(404, b"Not Found", body)
            return
        self._resolve(*resolve.groups(), body)

    def _repo_info(self, repo_id: str, revision: str, body: bool) -> None:
        hub = self.hub
        if not (hub.root / repo_id).is_dir():
            self._not_found("RepoNotFound", 401, body)
            return
        commit = hub.commit(repo_id, revision)
        if commit is None:
            self._not_found("RevisionNotFound", 404, body, revision)
            return
        info = {"id": repo_id, "sha": commit, "private": False, "gated": False}
        self._reply(200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})

    def _not_found(self, code: str, status: int, body: bool, revision: str = "") -> None:
        message = {
            "RepoNotFound": "Repository not found",
            "RevisionNotFound": f"Invalid rev id: {revision}",
        }.get(code, "Entry not found")
        self._reply(
            status,
            json.dumps({"error": message}).encode(),
            body,
            {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
        )

    def _resolve(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
        hub = self.hub
        if not (hub.root / repo_id).is_dir():
            self._not_found("RepoNotFound", 401, body)
            return
        commit = hub.commit(repo_id, unquote(revision))
        if commit is None:
            self._not_found("RevisionNotFound", 404, body, revision)
            return
        path = hub.file_at(repo_id, commit, filename)
        if not path.is_file():
            self._reply(
                404,
                b'{"error": "Entry not found"}',
                body,
                {
                    "X-Error-Code": "EntryNotFound",
                    "X-Error-Message": "Entry not found",
                    "X-Repo-Commit": commit,
                },
            )
            return
        etag = hub.etag(path)
        size = path.stat().st_size
        if not filename.endswith(_LFS_SUFFIXES):  # a git file (config.json): served here, its ETag a blob id
            self._send_file(path, body, {"ETag": f'"{etag[:40]}"', "X-Repo-Commit": commit})
            return
        with hub.lock:
            generation = hub._generation
        expires = time.time() + hub.url_lifetime_s
        query = f"gen={generation}&exp={expires:.3f}&name={quote(filename.rsplit('/', 1)[-1])}"
        headers = {
            "Location": f"{hub.storage}/blobs/{etag}?{query}",
            "X-Repo-Commit": commit,
            "X-Linked-Etag": f'"{etag}"',
            "X-Linked-Size": str(size),
            "ETag": f'"{hashlib.sha1(etag.encode()).hexdigest()}"',
        }
        if hub.xet_broken or hub.xet:
            headers["X-Xet-Hash"] = etag
            headers["X-Xet-Refresh-Route"] = f"{hub.endpoint}/api/models/{repo_id}/xet-read-token/{commit}"
        self._reply(302, b"", body, headers)


class _StorageHandler(_Base):
    """The storage host: signed blob URLs (rows 1, 2, 11, 14) and, for row 17, the Xet CAS (its
    reconstruction API and its xorbs, also at signed URLs)."""

    storage_host = True

    def do_POST(self) -> None:  # hf_xet posts telemetry to the CAS: taken and dropped
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.hub.lock:
            self.hub.requests.append((self.path, ""))
        self._reply(200, b"{}", True, {"Content-Type": "application/json"})

    def _serve(self, body: bool) -> None:
        hub = self.hub
        with hub.lock:
            hub.requests.append((self.path, self.headers.get("Range", "")))
        if re.match(r"^/v\d+/reconstructions/", self.path):
            self._reconstruction(body)
            return
        if self.headers.get("Authorization"):
            with hub.lock:
                hub.storage_saw_authorization += 1
            self._reply(400, b"Only one auth mechanism allowed", body)
            return
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with hub.lock:
            generation, blob = hub._generation, hub._blobs.get(url.path.removeprefix("/blobs/"))
        try:
            valid = int(query["gen"]) == generation and float(query["exp"]) > time.time()
        except (KeyError, ValueError):
            valid = False
        if not valid:
            self._reply(403, b"<Error><Code>AccessDenied</Code>Request has expired</Error>", body)
            return
        if blob is None or not blob.is_file():
            self._reply(404, b"NoSuchKey", body)
            return
        if blob.parent.name == ".xorbs" and not self.headers.get("Range"):  # a xorb is read by ranges only
            self._reply(403, b"<Error><Code>AccessDenied</Code>Range required</Error>", body)
            return
        self._send_file(blob, body, {"ETag": f'"{url.path.removeprefix("/blobs/")}"'})

    def _reconstruction(self, body: bool) -> None:
        """`GET /v1/reconstructions/{file_hash}` (optional `Range`): the terms and fetch info of xet-core's
        `QueryReconstructionResponse`; `/v2/` is not served (404: hf_xet then asks `/v1/`)."""
        hub = self.hub
        found = re.match(r"^/v1/reconstructions/([0-9a-f]{64})$", urlparse(self.path).path)
        if found is None:
            self._reply(404, b'{"error": "Not found"}', body, {"Content-Type": "application/json"})
            return
        if self.headers.get("Authorization") != f"Bearer {hub.xet_token}":
            self._reply(401, b'{"error": "Unauthorized"}', body, {"Content-Type": "application/json"})
            return
        layout = hub.xorbs(found.group(1))
        if not layout:
            self._reply(404, b'{"error": "File not found"}', body, {"Content-Type": "application/json"})
            return
        # every chunk's place: (xorb, index in it, first file byte, length, start and end in the xorb)
        places, at = [], 0
        for xorb_hash, ends in layout:
            for i, end in enumerate(ends):
                start = ends[i - 1] if i else 0
                places.append((xorb_hash, i, at, end - start - 8, start, end))
                at += end - start - 8
        size = at
        ranged = re.match(r"bytes=(\d+)-(\d+)$", self.headers.get("Range", ""))
        first, last = (int(ranged.group(1)), min(int(ranged.group(2)), size - 1)) if ranged else (0, size - 1)
        if first >= size:
            self._reply(
                416, b'{"error": "Range not satisfiable"}', body, {"Content-Type": "application/json"}
            )
            return
        wanted = [p for p in places if p[2] + p[3] > first and p[2] <= last]
        with hub.lock:
            generation = hub._generation
        expires = time.time() + hub.url_lifetime_s
        terms, fetch_info = [], {}
        for xorb_hash in dict.fromkeys(p[0] for p in wanted):  # one term per xorb, in file order
            mine = [p for p in wanted if p[0] == xorb_hash]
            chunks = {"start": mine[0][1], "end": mine[-1][1] + 1}
            terms.append({"hash": xorb_hash, "unpacked_length": sum(p[3] for p in mine), "range": chunks})
            url = f"{hub.storage}/blobs/{xorb_hash}?gen={generation}&exp={expires:.3f}"
            fetch_info[xorb_hash] = [
                {"range": chunks, "url": url, "url_range": {"start": mine[0][4], "end": mine[-1][5] - 1}}
            ]
        answer = {"offset_into_first_range": first - wanted[0][2], "terms": terms, "fetch_info": fetch_info}
        self._reply(200, json.dumps(answer).encode(), body, {"Content-Type": "application/json"})


class _ProxyHandler(_Base):
    """A proxy that wants credentials it is never given (row 16)."""

    def do_CONNECT(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        with self.hub.lock:
            self.hub.requests.append((f"proxy:{self.command} {self.path}", ""))
        self._reply(
            407,
            b"<html>Proxy Authentication Required</html>",
            body,
            {"Proxy-Authenticate": 'Basic realm="proxy"', "Content-Type": "text/html"},
        )


def _serve(handler: type[_Base], hub: OfflineHub) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (handler,), {"hub": hub}))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="offline-hub", daemon=True).start()
    return server


_SETTINGS = ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_XET_CACHE")


@contextlib.contextmanager
def offline_hub(root: str | Path, cache_dir: str | Path | None = None) -> Iterator[OfflineHub]:
    """Serve `root` as the Hugging Face hub for the duration of the block (see the module docstring).

    `HF_ENDPOINT` points at the loopback hub, `HF_HUB_CACHE` at `cache_dir` (default `root/.hf_cache`) and
    `HF_HUB_OFFLINE` is `0` (and `HF_XET_CACHE` is `root/.hf_xet`), in the environment, for the block (then
    restored): nothing touches the real hub
    or the real cache, and nothing of huggingface_hub or SAELens is replaced.
    """
    hub = OfflineHub(root=Path(root))
    servers = [_serve(handler, hub) for handler in (_HubHandler, _StorageHandler, _ProxyHandler)]
    ports = [server.server_address[1] for server in servers]
    hub.endpoint = f"http://127.0.0.1:{ports[0]}"
    hub.storage = f"http://127.0.0.1:{ports[1]}"
    hub.proxy = f"http://127.0.0.1:{ports[2]}"
    hub.tls_endpoint = f"https://127.0.0.1:{ports[0]}"  # TLS to a plain HTTP port: the handshake fails
    cache = Path(cache_dir) if cache_dir is not None else hub.root / ".hf_cache"
    before = {name: os.environ.get(name) for name in _SETTINGS}
    os.environ.update(
        {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_OFFLINE": "0",
            "HF_XET_CACHE": str(hub.root / ".hf_xet"),  # hf_xet's chunk cache and logs, not the user's
        }
    )
    try:
        yield hub
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        hub.stop.set()
        for server in servers:
            server.shutdown()
            server.server_close()
