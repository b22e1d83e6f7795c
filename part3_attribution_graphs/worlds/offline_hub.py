"""Exercise the real GemmaScope 2 loading code offline, against files laid out as on the hub.

`write_gemmascope_layout` saves transcoders exactly as `google/gemma-scope-2-*` stores them
(`transcoder_all/layer_{l}_width_{w}_l0_{l0}_affine/params.safetensors`, with keys `w_enc`, `w_dec`,
`b_enc`, `b_dec`, `threshold`, `affine_skip_connection` stored as (d_in, d_out)), and
`write_example_files` saves example data as `.../examples.safetensors` beside them. `offline_hub`
then serves that folder as the hub:

- SAELens' `hf_hub_download` (whole files) is substituted, served from the local folder;
- SAELens' HTTP GET with a `Range` header (to read a safetensors header without downloading the
  file) is substituted, served as a byte range of the local file;
- everything else that talks HTTP (the hub check of `worlds.hub`, the example data read by range in
  `views.remote_safetensors`) goes, unchanged, to a loopback HTTP server that, like the hub, redirects
  `{endpoint}/{repo_id}/resolve/{revision}/{path}` to a storage URL (here `/cdn/{repo_id}/{path}`),
  serves files there honouring `Range`, answers `/api/...` with 200, and counts the bytes it sends
  (`OfflineHub.bytes_sent`). huggingface_hub's `ENDPOINT` points there.

Everything between (config inference, shape reading, the W_skip transpose, class registry, range
arithmetic, caching) is the installed code, unchanged.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

from huggingface_hub.utils import EntryNotFoundError
from safetensors.torch import save_file
from torch import Tensor

from ..replacement import Transcoder

__all__ = ["write_gemmascope_layout", "write_example_files", "offline_hub", "OfflineHub", "GEMMASCOPE_REPO"]

GEMMASCOPE_REPO = "google/gemma-scope-2-1b-it"


def write_gemmascope_layout(
    transcoders: dict[int, Transcoder],
    root: str | Path,
    repo_id: str = GEMMASCOPE_REPO,
    width: str = "16k",
    l0: str = "small",
) -> list[Path]:
    """Write transcoders in GemmaScope 2's hub layout under `root/repo_id/`; returns the files written."""
    written = []
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
        written.append(path)
    return written


def _local(root: Path, repo_id: str, filename: str, subfolder: str | None = None) -> Path:
    path = root / repo_id / (f"{subfolder}/{filename}" if subfolder else filename)
    if not path.is_file():
        raise EntryNotFoundError(f"{path.relative_to(root)} is not in the offline hub")
    return path


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


@dataclass
class OfflineHub:
    """The folder served as the hub, the loopback URL it is served at, and what the server sent."""

    root: Path
    endpoint: str
    bytes_sent: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header or "")
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _handler(hub: OfflineHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            with hub.lock:
                hub.requests.append((self.path, self.headers.get("Range", "")))
            if self.path.startswith("/api/"):
                self._reply(200, b"{}", body)
                return
            resolve = re.match(r"^/(.+?)/resolve/[^/]+/(.+)$", self.path)
            if resolve:  # as the hub does, redirect file downloads to its storage (here: /cdn/...)
                self.send_response(302)
                self.send_header("Location", f"/cdn/{resolve.group(1)}/{resolve.group(2)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            match = re.match(r"^/cdn/(.+)$", self.path)
            path = hub.root / match.group(1) if match else None
            if path is None or not path.is_file():
                self._reply(404, b"Entry not found", body)
                return
            size = path.stat().st_size
            start, end, status = 0, size - 1, 200
            ranged = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
            if ranged:
                start = int(ranged.group(1))
                end = min(int(ranged.group(2) or size - 1), size - 1)
                status = 206
                if start > end:
                    self._reply(416, b"", body)
                    return
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start + 1) if body else b""
            self.send_response(status)
            self.send_header("Content-Length", str(end - start + 1))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                self.wfile.write(data)
                with hub.lock:
                    hub.bytes_sent += len(data)

        def _reply(self, status: int, data: bytes, body: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


@contextlib.contextmanager
def offline_hub(root: str | Path) -> Iterator[OfflineHub]:
    """Serve `root` as the Hugging Face hub for the duration of the block (see the module docstring)."""
    from huggingface_hub import constants
    from sae_lens.loading import pretrained_sae_loaders as loaders

    root = Path(root)

    def fake_download(repo_id: str, filename: str, subfolder: str | None = None, **_) -> str:
        return str(_local(root, repo_id, filename, subfolder))

    def fake_range_get(url: str, headers: dict, max_attempts: int = 5) -> SimpleNamespace:
        match = re.match(r"https?://[^/]+/(.+?)/resolve/[^/]+/(.+)$", url)
        if match is None:
            raise ValueError(f"unexpected hub url {url}")
        path = _local(root, match.group(1), match.group(2))
        start, end = map(int, re.match(r"bytes=(\d+)-(\d+)", headers["Range"]).groups())
        with open(path, "rb") as f:
            f.seek(start)
            return SimpleNamespace(content=f.read(end - start + 1), status_code=206)

    hub = OfflineHub(root=root, endpoint="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="offline-hub", daemon=True)
    thread.start()
    try:
        with (
            mock.patch.object(loaders, "hf_hub_download", fake_download),
            mock.patch.object(loaders, "_get_with_rate_limit_retry", fake_range_get),
            mock.patch.object(constants, "ENDPOINT", hub.endpoint),
            mock.patch.object(constants, "HF_HUB_OFFLINE", False),
        ):
            yield hub
    finally:
        server.shutdown()
        server.server_close()
