"""Exercise the real GemmaScope 2 loading code offline, against files laid out as on the hub.

`write_gemmascope_layout` saves transcoders exactly as `google/gemma-scope-2-*` stores them
(`transcoder_all/layer_{l}_width_{w}_l0_{l0}_affine/params.safetensors`, with keys `w_enc`, `w_dec`,
`b_enc`, `b_dec`, `threshold`, `affine_skip_connection` stored as (d_in, d_out)). `offline_hub`
then substitutes the two network calls SAELens makes, and nothing else:

- `hf_hub_download` (whole files), served from the local folder;
- the HTTP GET with a `Range` header that SAELens uses to read a safetensors header without
  downloading the file, served as a byte range of the local file.

Everything between (config inference, shape reading, the W_skip transpose, class registry) is the
installed SAELens code, unchanged.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

from huggingface_hub.utils import EntryNotFoundError
from safetensors.torch import save_file

from ..replacement import Transcoder

__all__ = ["write_gemmascope_layout", "offline_hub", "GEMMASCOPE_REPO"]

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
            "w_enc": tc.W_enc, "w_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec,
            "threshold": tc.threshold, "affine_skip_connection": tc.W_skip.T,  # the hub keeps (d_in, d_out)
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


@contextlib.contextmanager
def offline_hub(root: str | Path) -> Iterator[Path]:
    """Serve SAELens' hub downloads and HTTP range reads from `root` for the duration of the block."""
    root = Path(root)
    from sae_lens.loading import pretrained_sae_loaders as loaders

    def fake_download(repo_id: str, filename: str, subfolder: str | None = None, **_) -> str:
        return str(_local(root, repo_id, filename, subfolder))

    def fake_range_get(url: str, headers: dict, max_attempts: int = 5) -> SimpleNamespace:
        match = re.match(r"https://[^/]+/(.+?)/resolve/[^/]+/(.+)$", url)
        if match is None:
            raise ValueError(f"unexpected hub url {url}")
        path = _local(root, match.group(1), match.group(2))
        start, end = map(int, re.match(r"bytes=(\d+)-(\d+)", headers["Range"]).groups())
        with open(path, "rb") as f:
            f.seek(start)
            return SimpleNamespace(content=f.read(end - start + 1), status_code=206)

    with mock.patch.object(loaders, "hf_hub_download", fake_download), \
            mock.patch.object(loaders, "_get_with_rate_limit_retry", fake_range_get):
        yield root
