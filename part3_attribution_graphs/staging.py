"""Writing a program's files into the user's folder: staged, moved in together, never over the user's own.

    folder = OutputFolder(out, known=("graph.pt", "nodes.json"), manifest=".part3_attribution_graphs.json")
    folder.check(planned, force)          # before any slow work
    with folder.staged() as stage:        # a hidden folder inside `out`, removed however the block ends
        ...write the files into stage...
        folder.commit(stage, written)

- `out` keeps a list of the files this program wrote there (`manifest`); a file of a planned name that is
  not on it is the user's, and is replaced only with `force` (and only if it is still the file seen by
  `check`: a file saved there during the run is never replaced).
- The staging folder goes on any exit: an exception, Ctrl-C, SIGTERM or SIGHUP (raised as `Terminated`,
  a `SystemExit` with status 128 + the signal's number).
- `commit` moves the previous set aside, moves the new set in and rewrites the list last; if any step fails
  the previous set is put back, so `out` holds the old set or the new one, never a mix. Signals wait until
  it is done.

Standard library only: the CLI imports this before its arguments are checked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["OutputError", "OutputFolder", "Terminated"]

# Signals that end a run: turned into `Terminated`, so that `finally` blocks run and the stage goes.
_ENDING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class OutputError(Exception):
    """A problem with the output folder, said in one line with what to do."""


class Terminated(SystemExit):
    """The process got SIGTERM or SIGHUP: unwinds like an exception, then exits with 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _move(src: Path, dst: Path) -> None:
    """One rename (a separate function, so a test can make one step of a commit fail)."""
    os.replace(src, dst)


@contextmanager
def _signals(handler_for: dict[int, object]) -> Iterator[None]:
    """Install handlers for these signals for the block (main thread only; signals the process ignores,
    as under `nohup`, stay ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum, handler in handler_for.items():
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, handler)  # type: ignore[arg-type]
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextmanager
def _held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP back until the block ends, then act on the first one caught."""
    caught: list[int] = []
    with _signals({s: (lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, *_ENDING)}):
        yield
    if caught:
        if caught[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(caught[0])


@dataclass
class OutputFolder:
    """The folder `out` a program writes its `known` files into (see the module docstring)."""

    out: Path
    known: tuple[str, ...]
    manifest: str
    flag: str = "--out"
    # Set by `check`: the user's files that `force` allows replacing, as they were then.
    _replaceable: dict[str, tuple[int, int, int] | None] = field(default_factory=dict, repr=False)

    def ours(self) -> set[str]:
        """The known files an earlier run wrote into `out` (from the list there)."""
        try:
            listed = json.loads((self.out / self.manifest).read_text())["files"]
            return {name for name in listed if name in self.known}
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def _theirs(self, planned: tuple[str, ...] | list[str]) -> list[str]:
        mine = self.ours()
        return sorted(name for name in planned if (self.out / name).exists() and name not in mine)

    def _folders(self, planned: tuple[str, ...] | list[str]) -> list[str]:
        return [name for name in planned if (self.out / name).is_dir()]

    def check(self, planned: tuple[str, ...], force: bool = False) -> Path:
        """Create `out` if needed and check that files can be written there and that none of the user's own
        would be replaced (unless `force`), before any slow work starts."""
        out, flag = self.out, self.flag
        if out.exists() and not out.is_dir():
            raise OutputError(f"{flag} {out} is a file, not a folder: choose a folder for the files.")
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as err:
            raise OutputError(
                f"cannot write to {flag} {out} ({err.strerror or err}): choose a folder you can write to."
            ) from None
        folders = self._folders(planned)
        if folders:
            raise OutputError(
                f"{flag} {out} holds the folder(s) {', '.join(folders)} where a file goes: move them."
            )
        theirs = self._theirs(planned)
        if theirs and not force:
            raise OutputError(
                f"{flag} {out} already holds {', '.join(theirs)}, which this program did not write there and "
                "would overwrite: choose another folder, move them away, or pass --force to replace them."
            )
        self._replaceable = {name: _file_id(out / name) for name in theirs}
        return out

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """A hidden staging folder inside `out`, removed however the block ends (SIGTERM and SIGHUP become
        `Terminated` meanwhile)."""
        stage = Path(tempfile.mkdtemp(dir=self.out, prefix=".partial-"))
        try:
            with _signals({s: _raise_terminated for s in _ENDING}):
                yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def commit(self, stage: Path, written: list[str]) -> None:
        """Move the staged files `written` into `out` together: the previous run's files go, the new ones
        come, the list of ours is rewritten last. On any failure the previous set is put back."""
        out = self.out
        with _held():
            folders = self._folders(written)
            appeared = [
                name
                for name in self._theirs(written)
                if name not in self._replaceable or _file_id(out / name) != self._replaceable[name]
            ]
            if folders or appeared:
                raise OutputError(
                    f"{self.flag} {out}: {', '.join(folders + appeared)} appeared or changed there while "
                    "this program ran, and it did not write them: nothing was replaced. Move them away and "
                    "run again."
                )
            previous = stage / ".previous"
            previous.mkdir()
            old = self.ours()
            moved_old: list[str] = []
            moved_new: list[str] = []
            try:
                for name in sorted(old | set(written)):
                    if (out / name).exists():
                        _move(out / name, previous / name)
                        moved_old.append(name)
                for name in written:
                    _move(stage / name, out / name)
                    moved_new.append(name)
                (stage / self.manifest).write_text(json.dumps({"files": sorted(written)}))
                _move(stage / self.manifest, out / self.manifest)
            except BaseException:
                for name in moved_new:
                    (out / name).unlink(missing_ok=True)
                for name in moved_old:
                    os.replace(previous / name, out / name)
                raise
