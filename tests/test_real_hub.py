"""The hub path against a loopback hub that behaves like the real one: one or more tests per row of issue 19
(redirects to another host with signed, expiring URLs; re-uploads; gzip; rate limits; tokens; the real file
layouts; missing files; SAELens' own requests; Xet; captive portals; lying or slow hosts; unusable caches)
and of issue 25 (RateLimit windows, 5xx, resets mid-body, TLS and proxy failures, settings read at call
time, huggingface_hub's token order and backoff, the fallback after a gated 403, a wall-clock download
deadline, one commit per load, a normal download through hf_xet and the fake's CAS).

Every server is on 127.0.0.1 (`worlds.offline_hub`), reached through `HF_ENDPOINT` as any installed
huggingface_hub version allows; nothing reaches the network.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from huggingface_hub import constants

from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.views import examples as ex
from part3_attribution_graphs.views.examples import (
    example_file_path,
    feature_examples,
    load_example_data,
    load_example_data_parallel,
    local_example_rows,
    make_toy_example_data,
)
from part3_attribution_graphs.views.remote_safetensors import RemoteSafetensors
from part3_attribution_graphs.worlds import gemma270m_scope, hub, registry
from part3_attribution_graphs.worlds.gemma import (
    HubUnreachableError,
    load_saes_parallel,
    transcoder_ids,
)
from part3_attribution_graphs.worlds.gemma270m_scope import RELEASE, REPO_ID
from part3_attribution_graphs.worlds.offline_hub import (
    offline_hub,
    real_example_schema,
    write_example_files,
    write_gemmascope_layout,
)

LAYER = 7
FILENAME = example_file_path(LAYER)
FEATURES = [3, 40, 41, 200, 511, 700, 1023]


@pytest.fixture(autouse=True)
def no_token(monkeypatch, tmp_path):
    """No token anywhere (environment, `.env`, login file, Colab) unless a test sets one."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hub, "find_dotenv", lambda start=None: None)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-token"))


@pytest.fixture(scope="module")
def schema_file(tmp_path_factory):
    """An examples.safetensors in GemmaScope 2's real schema (1,024 latents, K = 1000, tokens (2000, 256))."""
    root = tmp_path_factory.mktemp("hub")
    data = real_example_schema(1024, 2000)
    (path,) = write_example_files({LAYER: data}, root, repo_id=REPO_ID)
    return root, path, data


def _load(features=FEATURES, cache=None, n_examples=20):
    return load_example_data(
        LAYER,
        model_size="270m",
        instruction_tuned=False,
        features=features,
        n_examples=n_examples,
        range_cache=cache,
    )


def _expected(data, features=FEATURES, n=20):
    return {
        "activations": data["activations"][features, :n],
        "positions": data["positions"][features, :n],
        "feature_frequencies": data["feature_frequencies"][features],
        "top_tokens": data["top_tokens"][features],
    }


def _assert_rows(got, data, features=FEATURES):
    for key, value in _expected(data, features).items():
        assert torch.equal(got[key], value), key
    f = features[1]  # its strongest example's text is the corpus around it
    (top,) = feature_examples(got, f, None, n_examples=1)
    seq, pos = int(data["seq_ids"][f, 0]), int(data["positions"][f, 0])
    assert top["token_ids"] == data["tokens"][seq, max(0, pos - 12) : pos + 5].tolist()


# ------------------------------------------------------------------ row 1: Range ignored under gzip


def test_a_host_that_ignores_range_under_gzip_is_never_downloaded(schema_file, tmp_path, capsys):
    root, path, data = schema_file
    with offline_hub(root) as served:
        served.ignore_range_under_gzip = True
        got = _load(cache=tmp_path / "c.db")
        sent = served.bytes_sent
    _assert_rows(got, data)
    size = path.stat().st_size
    with capsys.disabled():
        print(
            f"\n[row 1] gzip-happy host: {sent / 2**20:.2f} MiB sent for {len(FEATURES)} latents of a "
            f"{size / 2**20:.1f} MiB file"
        )
    assert sent < 0.05 * size  # the rows and their sequences, not the file


# ------------------------------------------------------------------ row 2: re-upload, signed URLs


def test_a_reupload_with_the_same_shapes_is_read_anew(schema_file, tmp_path):
    root, _, _ = schema_file
    repo = tmp_path / "hub"
    first, second = real_example_schema(1024, 2000, seed=1), real_example_schema(1024, 2000, seed=2)
    write_example_files({LAYER: first}, repo, repo_id=REPO_ID)
    cache = tmp_path / "c.db"
    with offline_hub(repo) as served:
        _assert_rows(_load(cache=cache), first)
        served.reupload(REPO_ID, FILENAME, second)  # same names, dtypes and shapes, new values and commit
        _assert_rows(_load(cache=cache), second)


def test_storage_urls_are_signed_expire_and_never_get_the_token(schema_file, tmp_path, monkeypatch):
    root, _, data = schema_file
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    with offline_hub(root) as served:
        served.valid_tokens = {"hf_good"}
        source = RemoteSafetensors(REPO_ID, FILENAME, token="hf_good", cache=False)
        assert source.etag and source.commit and source.size == (root / REPO_ID / FILENAME).stat().st_size
        served.expire_signed_urls()  # the URL the reader holds now answers 403: it asks the hub again
        torch.testing.assert_close(source.read_rows("activations", [5], 20), data["activations"][[5], :20])
        assert served.storage_saw_authorization == 0
        assert sum("/resolve/" in p for p, _ in served.requests) == 2


# ------------------------------------------------------------------ row 3: rate limits


def test_a_rate_limited_cold_load_waits_and_succeeds(toy_world, schema_file, tmp_path):
    """429 with the hub's `RateLimit` header, then success: transcoders (waited out by huggingface_hub 2.x
    itself, by hub_download on 0.36, which does not retry 429) and ranges."""
    _, transcoders = toy_world
    root, _, data = schema_file
    write_gemmascope_layout({0: transcoders[0]}, root, repo_id=REPO_ID)
    with offline_hub(root, cache_dir=tmp_path / "hf") as served:
        served.rate_limit(2, window_s=1)
        loaded = load_saes_parallel(RELEASE, transcoder_ids(1), max_workers=1)
        served.rate_limit(2, window_s=1)
        got = _load(cache=tmp_path / "c.db")
    torch.testing.assert_close(loaded[0].W_enc, transcoders[0].W_enc)
    _assert_rows(got, data)


def test_a_rate_limit_window_longer_than_the_deadline_fails_at_once_naming_it(schema_file):
    """The hub's 5-minute window (`RateLimit: "api";r=0;t=300`, no Retry-After) is read: the range reader
    does not retry into the same window, it stops after one request and says how long the hub asked."""
    root, _, _ = schema_file
    with offline_hub(root) as served:
        served.rate_limit(1000, window_s=300)
        with pytest.raises(HubUnreachableError, match="rate limited") as err:
            _load(cache=False)
        asked = len(served.requests)  # the revision's commit is the first thing asked
    assert err.value.kind == "rate limited"
    assert "300 s" in str(err.value)
    assert asked == 1  # not five tries, each answered 429 within the same window


# ------------------------------------------------------------------ row 4: tokens


def test_the_token_is_found_where_huggingface_hub_finds_it(tmp_path, monkeypatch):
    """huggingface_hub's `get_token` decides (its order, whatever the installed version); `.env` only when it
    finds none. Today's code read `.env` before `HUGGING_FACE_HUB_TOKEN` and the login file."""
    from huggingface_hub import get_token

    dotenv = tmp_path / ".env"
    dotenv.write_text("HF_TOKEN=hf_from_dotenv\n")
    monkeypatch.setattr(hub, "find_dotenv", lambda start=None: dotenv)
    assert hub.find_hf_token() == "hf_from_dotenv" and get_token() is None
    login = tmp_path / "token"
    login.write_text("hf_from_login\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(login))  # the test's own login file, not the user's
    assert hub.find_hf_token() == get_token() == "hf_from_login"
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_from_old_variable")
    assert hub.find_hf_token() == get_token()
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hub.find_hf_token() == get_token() == "hf_from_env"


def test_the_implicit_token_switch_is_honoured(toy_world, tmp_path, monkeypatch, schema_file):
    """`HF_HUB_DISABLE_IMPLICIT_TOKEN=1` (set after import): the token found is not sent, by the range reader
    or by downloads (the hub here refuses it, so sending it would warn that it is stale)."""
    _, transcoders = toy_world
    root, _, data = schema_file
    write_gemmascope_layout({0: transcoders[0]}, root, repo_id=REPO_ID)
    monkeypatch.setenv("HF_TOKEN", "hf_not_for_this_hub")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    assert hub.implicit_token() is None and hub.find_hf_token() == "hf_not_for_this_hub"
    with offline_hub(root, cache_dir=tmp_path / "hf") as served, warnings.catch_warnings():
        warnings.simplefilter("error")  # a stale-token warning would fail the test
        served.valid_tokens = {"hf_good"}
        got = _load(cache=False)
        loaded = load_saes_parallel(RELEASE, transcoder_ids(1), max_workers=1)
    _assert_rows(got, data)
    torch.testing.assert_close(loaded[0].W_dec, transcoders[0].W_dec)


@pytest.mark.parametrize(
    "value, says",
    [
        ("hf_first\nhf_second", "line break"),
        ("hf_abc def", "a space"),
        ("hf_caf\u00e9", "'\u00e9'"),
        ("hf_\u4e2d\u6587", "'\u4e2d'"),
    ],
)
def test_a_token_that_cannot_be_a_header_is_named_not_sent(monkeypatch, value, says):
    monkeypatch.setenv("HF_TOKEN", value)
    with pytest.raises(ValueError, match="HF_TOKEN in the environment") as err:
        hub.find_hf_token()
    assert says in str(err.value) and "settings/tokens" in str(err.value)


def test_a_token_is_stripped(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "  hf_padded \n")
    assert hub.find_hf_token() == "hf_padded"


def test_a_dotenv_path_that_does_not_exist_is_named(tmp_path):
    missing = tmp_path / "nowhere" / ".env"
    with pytest.raises(FileNotFoundError, match="dotenv_path") as err:
        hub.find_hf_token(missing)
    assert str(missing) in str(err.value)


def test_a_stale_token_is_dropped_for_public_files_with_a_warning(
    toy_world, schema_file, tmp_path, monkeypatch
):
    _, transcoders = toy_world
    root, _, data = schema_file
    write_gemmascope_layout({0: transcoders[0]}, root, repo_id=REPO_ID)
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    with offline_hub(root, cache_dir=tmp_path / "hf") as served:
        served.valid_tokens = {"hf_good"}
        with pytest.warns(UserWarning, match="stale") as caught:
            got = _load(cache=tmp_path / "c.db")
        assert "HF_TOKEN in the environment" in str(caught[0].message)
        with pytest.warns(UserWarning, match="stale"):
            loaded = load_saes_parallel(RELEASE, transcoder_ids(1), max_workers=1)
    _assert_rows(got, data)
    torch.testing.assert_close(loaded[0].W_dec, transcoders[0].W_dec)


# ------------------------------------------------------------------ row 5: the real schema, and others


def test_the_real_example_schema_is_read(schema_file, tmp_path):
    root, _, data = schema_file
    assert data["seq_ids"].dtype == torch.int64 and data["tokens"].shape[1] == 256
    with offline_hub(root):
        got = _load(cache=tmp_path / "c.db")
    _assert_rows(got, data)
    assert "logit_effects" not in got  # extra keys are left on the hub


def test_an_unexpected_example_schema_is_a_clear_fallback_not_a_crash(tmp_path):
    data = real_example_schema(64, 50, k=8)
    del data["top_logits"]
    write_example_files({LAYER: data}, tmp_path, repo_id=REPO_ID)
    with offline_hub(tmp_path), pytest.raises(HubUnreachableError, match="top_logits") as err:
        _load(features=[1, 2], cache=tmp_path / "c.db")
    assert err.value.kind == "unexpected answer"


# ------------------------------------------------------------------ row 6: a missing layer


def test_a_missing_example_file_is_reported_as_not_found(tmp_path):
    (tmp_path / REPO_ID).mkdir(parents=True)
    with offline_hub(tmp_path), pytest.raises(HubUnreachableError) as err:
        _load(features=[1], cache=tmp_path / "c.db")
    msg = str(err.value)
    assert "not found" in msg and "404" in msg and "network" not in msg.split("Everything")[0]
    assert err.value.kind == "not found"


def test_one_missing_layer_falls_back_for_that_layer_and_its_graph_latents_only(toy_world, tmp_path, capsys):
    model, transcoders = toy_world
    result = attribute(model, transcoders, gemma270m_scope.LESSON_PROMPT, batch_size=64)
    wanted = ex.features_in_graph(result)
    full = make_toy_example_data(model, transcoders, n_sequences=64)
    missing = sorted(wanted)[1]
    write_example_files({k: v for k, v in full.items() if k != missing}, tmp_path, repo_id=REPO_ID)
    with offline_hub(tmp_path):
        got = load_example_data_parallel(
            range(model.cfg.n_layers),
            model_size="270m",
            instruction_tuned=False,
            features_by_layer=wanted,
            n_examples=8,
            range_cache=tmp_path / "c.db",
            model=model,
            transcoders=transcoders,
        )
    out = capsys.readouterr().out
    assert f"layer(s) [{missing}]" in out and "not found" in out
    for layer, feats in wanted.items():
        assert got[layer]["feature_ids"].tolist() == feats  # only the graph's latents, every layer
    local = local_example_rows(model, transcoders, {missing: wanted[missing]})[missing]
    torch.testing.assert_close(got[missing]["activations"], local["activations"])
    hub_layer = next(layer for layer in wanted if layer != missing)
    torch.testing.assert_close(
        got[hub_layer]["activations"], full[hub_layer]["activations"][wanted[hub_layer], :8]
    )


def test_local_example_rows_are_the_full_local_data_for_those_latents(toy_world):
    model, transcoders = toy_world
    chosen = {0: [1, 5, 17], 2: [0, 3]}
    full = make_toy_example_data(model, transcoders, n_sequences=64, features_by_layer=chosen)
    local = local_example_rows(model, transcoders, chosen, n_sequences=64)
    assert sorted(local) == sorted(chosen)
    for layer, feats in chosen.items():
        for key in ("activations", "feature_frequencies", "top_tokens", "bottom_logits"):
            torch.testing.assert_close(local[layer][key].float(), full[layer][key][feats].float(), msg=key)
        for f in feats:  # the same windows of text (activations equal to float32 rounding, see above)
            ours, theirs = (feature_examples(d[layer], f, None, 3) for d in (local, full))
            assert [(e["seq_id"], e["peak"], e["token_ids"]) for e in ours] == [
                (e["seq_id"], e["peak"], e["token_ids"]) for e in theirs
            ]


# ------------------------------------------------------------------ row 7: SAELens' own requests, offline


_SAELENS_BOTH_WAYS = """
import sys, torch
from sae_lens import SAE
from part3_attribution_graphs.worlds.gemma import gemmascope_transcoder_loader
release, sae_id = sys.argv[1:3]
theirs, their_cfg, _ = SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id)
loader = gemmascope_transcoder_loader
ours, our_cfg, _ = SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id, converter=loader)
assert our_cfg == their_cfg, (our_cfg, their_cfg)
assert ours.state_dict().keys() == theirs.state_dict().keys()
for key, value in theirs.state_dict().items():
    assert torch.equal(ours.state_dict()[key], value), key
print("same")
"""


def test_saelens_own_loader_is_served_and_ours_gives_the_same_transcoder(toy_world, tmp_path):
    """SAELens' own loader calls huggingface_hub without `endpoint=`, so it reaches the fake hub only through
    `HF_ENDPOINT` set before huggingface_hub is imported: in a fresh interpreter, as the supported door is."""
    _, transcoders = toy_world
    write_gemmascope_layout({1: transcoders[1]}, tmp_path, repo_id=REPO_ID)
    (sae_id,) = transcoder_ids(2)[1:]
    with offline_hub(tmp_path, cache_dir=tmp_path / "hf") as served:
        run = subprocess.run(
            [sys.executable, "-c", _SAELENS_BOTH_WAYS, RELEASE, sae_id],
            capture_output=True,
            text=True,
            timeout=300,
            env=os.environ.copy(),  # HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE=0 from the block
        )
        requests = list(served.requests)
    assert run.returncode == 0 and run.stdout.strip().endswith("same"), run.stderr[-3000:]
    assert any(r.startswith("bytes=0-7") for _, r in requests)  # SAELens' header read, served


@contextlib.contextmanager
def no_hub_at_all(cache):
    """HF_HUB_OFFLINE=1 (set after import, as in a notebook cell), every endpoint a closed port, and
    huggingface_hub's cache at `cache`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_ENDPOINT", dead)
        mp.setenv("HF_HUB_CACHE", str(cache))
        yield


def test_scope_world_loads_offline_from_a_warm_cache(toy_world, tmp_path, monkeypatch):
    from part3_attribution_graphs.worlds import gemma270m

    model, transcoders = toy_world
    monkeypatch.setattr(gemma270m, "load_gemma3_270m_offline", lambda **k: (model, {}))
    write_gemmascope_layout(transcoders, tmp_path / "hub", repo_id=REPO_ID)
    cache = tmp_path / "hf"
    with offline_hub(tmp_path / "hub", cache_dir=cache):
        _, cold = gemma270m_scope.load_gemma270m_scope_world(report=False)
    with no_hub_at_all(cache):
        _, warm = gemma270m_scope.load_gemma270m_scope_world(report=False)
    for layer, tc in transcoders.items():
        torch.testing.assert_close(warm[layer].W_skip, tc.W_skip)
        assert warm[layer].cfg.metadata.hook_name == cold[layer].cfg.metadata.hook_name
    monkeypatch.setattr(gemma270m_scope, "N_LAYERS", len(transcoders))  # the toy world's layers stand in
    monkeypatch.setattr(registry, "has_270m_weights", lambda: True)
    with no_hub_at_all(cache):  # and "auto" takes it, offline
        assert registry.choose_world("auto")[0] == "gemma270m-scope"
    with no_hub_at_all(tmp_path / "empty"):
        assert registry.choose_world("auto")[0] == registry.OFFLINE_WORLD
        with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE") as err:  # a cold cache says so
            gemma270m_scope.load_gemma270m_scope_world(report=False)
    assert err.value.kind == "offline"


# ------------------------------------------------------------ issue 25 item 1: offline, read at call time


def test_offline_set_after_import_reads_rows_from_the_warm_range_cache_without_a_request(
    schema_file, tmp_path
):
    root, _, data = schema_file
    cache = tmp_path / "c.db"
    with offline_hub(root) as served:
        _assert_rows(_load(cache=cache), data)
        before = len(served.requests)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")  # as a notebook cell sets it, long after import
            _assert_rows(_load(cache=cache), data)
            with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE") as err:
                _load(features=[5, 6], cache=cache)  # rows never read: offline says so, asks nothing
        assert len(served.requests) == before
    assert err.value.kind == "offline"


def test_an_example_file_in_huggingface_hubs_cache_is_read_there(schema_file, tmp_path):
    root, _, data = schema_file
    hf_cache = tmp_path / "hf"
    with offline_hub(root, cache_dir=hf_cache) as served:
        load_example_data(LAYER, model_size="270m", instruction_tuned=False)  # the whole file, into the cache
        before = len(served.requests)
        _assert_rows(_load(cache=False), data)  # rows from that file: no range request
        assert [p for p, _ in served.requests[before:]] == [f"/api/models/{REPO_ID}/revision/main"]
    with no_hub_at_all(hf_cache):
        _assert_rows(_load(cache=False), data)


# ------------------------------------------------------------ issue 27: the range cache checks its bytes


def test_range_cache_rows_overwritten_with_zeros_are_not_served(schema_file, tmp_path):
    root, _, data = schema_file
    cache = tmp_path / "c.db"
    with offline_hub(root) as served:
        _assert_rows(_load(cache=cache), data)
        with sqlite3.connect(cache) as db:  # every cached block but the header: zeros of the same length
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            table = "blocks" if "blocks" in tables else "chunks"
            db.execute(f"UPDATE {table} SET data = zeroblob(length(data)) WHERE start > 8")
        before = len(served.requests)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _load(cache=cache)
        fetched_again = len(served.requests) > before
    _assert_rows(got, data)
    assert fetched_again
    assert any(str(cache) in str(w.message) and "checksum" in str(w.message) for w in caught)


# ------------------------------------------------------------------ issue 25 item 7: a reset mid-body


def test_a_connection_reset_mid_body_is_resumed(schema_file, tmp_path):
    root, _, data = schema_file
    with offline_hub(root) as served:
        served.reset_mid_body(3, after=100)
        got = _load(cache=False)
        ranges = [r for p, r in served.requests if p.startswith("/blobs/")]
    _assert_rows(got, data)
    spans = [tuple(int(x) for x in r.removeprefix("bytes=").split("-")) for r in ranges]
    resumed = [(s, e) for s, e in spans if (s - 100, e) in spans]  # asked again from the first byte missed
    assert len(resumed) == 3


# ------------------------------------------------------------------ issue 25 item 2: no retries on retries


def test_a_download_is_tried_once_as_huggingface_hubs_own_backoff_already_retried(monkeypatch):
    """hub_download must not wrap huggingface_hub's backoff (5 tries of 5xx) in 5 more tries of its own."""
    import requests

    calls = []

    def always_503(**kwargs):
        calls.append(kwargs)
        response = requests.Response()
        response.status_code, response.url = 503, "http://hub/resolve"
        raise requests.HTTPError("503 Server Error", response=response)

    with pytest.raises(requests.HTTPError):
        hub.hub_download("google/x", "f.safetensors", download=always_503)
    assert len(calls) == 1
    assert calls[0]["endpoint"] == hub.hub_endpoint() and "local_files_only" in calls[0]


def test_the_endpoint_and_offline_setting_are_read_when_called(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert hub.hub_endpoint() == "http://127.0.0.1:9"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_offline() and not hub.hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.hub_offline()


# ------------------------------------------------------------------ issue 25 item 4: failure kinds


@pytest.mark.parametrize(
    "err, kind",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
        (OSError(errno.EROFS, "Read-only file system"), "cache not writable"),
        (PermissionError(errno.EACCES, "Permission denied"), "cache not writable"),
    ],
)
def test_local_failures_are_not_told_as_network(err, kind):
    assert hub.failure_kind(RuntimeError("download failed").with_traceback(None)) == "unexpected answer"
    wrapped = RuntimeError("download failed")
    wrapped.__cause__ = err
    assert hub.failure_kind(wrapped) == kind
    assert "HF_HUB_CACHE" in str(hub.hub_error("a file", wrapped))


def test_a_tls_failure_is_told_as_tls(schema_file, monkeypatch):
    root, _, _ = schema_file
    with offline_hub(root) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.tls_endpoint)
        with pytest.raises(HubUnreachableError) as err:
            _load(cache=False)
        with pytest.raises(HubUnreachableError) as checked:
            hub.check_hub("the transcoders", timeout=2.0)
    assert err.value.kind == checked.value.kind == "TLS"
    assert "REQUESTS_CA_BUNDLE" in str(err.value)


def test_a_proxy_that_wants_credentials_is_told_as_proxy(schema_file, monkeypatch):
    root, _, _ = schema_file
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with offline_hub(root) as served:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(name, served.proxy)
        with pytest.raises(HubUnreachableError) as err:
            _load(cache=False)
        with pytest.raises(HubUnreachableError) as checked:
            hub.check_hub("the transcoders", timeout=2.0)
        proxied = [p for p, _ in served.requests if p.startswith("proxy:")]
    assert proxied  # the requests went to the proxy
    assert err.value.kind == checked.value.kind == "proxy"
    assert "HTTPS_PROXY" in str(err.value)


def test_server_errors_are_retried_and_then_served(schema_file, tmp_path):
    root, _, data = schema_file
    with offline_hub(root) as served:
        served.server_errors(2, status=502)
        _assert_rows(_load(cache=False), data)


# ------------------------------------------------------------------ row 8: Xet


def test_a_xet_storage_failure_is_a_hub_error_and_auto_falls_back(toy_world, tmp_path, monkeypatch, capsys):
    pytest.importorskip("hf_xet")  # without it huggingface_hub downloads over plain HTTP: no Xet path
    model, transcoders = toy_world
    write_gemmascope_layout({0: transcoders[0]}, tmp_path, repo_id=REPO_ID)
    with offline_hub(tmp_path, cache_dir=tmp_path / "hf") as served:
        served.xet_broken = True
        with pytest.raises(HubUnreachableError, match="Xet"):
            load_saes_parallel(RELEASE, transcoder_ids(1), max_workers=1)

        from part3_attribution_graphs.worlds import gemma270m

        monkeypatch.setattr(gemma270m, "load_gemma3_270m_offline", lambda **k: (model, {}))
        monkeypatch.setattr(
            registry, "choose_world", lambda w: ("gemma270m-scope", "t") if w == "auto" else (w, "")
        )
        name, _, _ = registry.load_world("auto", device="cpu")
    assert name == registry.OFFLINE_WORLD and "Xet" in capsys.readouterr().out


def test_a_normal_download_goes_through_xet_end_to_end(toy_world, tmp_path):
    """With the hub advertising Xet (`X-Xet-Hash`), huggingface_hub hands the download to hf_xet, which gets a
    CAS token from the hub, the file's reconstruction from the CAS and its xorbs by ranges from storage: the
    transcoders and a whole example file load that way, and the file is never fetched as a blob. Today's
    fake serves no CAS, so every download there takes the plain HTTP path."""
    pytest.importorskip("hf_xet")  # without it huggingface_hub downloads over plain HTTP: no Xet path
    _, transcoders = toy_world
    write_gemmascope_layout({0: transcoders[0]}, tmp_path, repo_id=REPO_ID)
    data = real_example_schema(64, 600, k=40)  # 0.7 MB: 11 chunks
    write_example_files({LAYER: data}, tmp_path, repo_id=REPO_ID)
    with offline_hub(tmp_path, cache_dir=tmp_path / "hf") as served:
        served.xet = True
        loaded = load_saes_parallel(RELEASE, transcoder_ids(1), max_workers=1)
        whole = load_example_data(LAYER, model_size="270m", instruction_tuned=False)
        params, examples = (
            served.etag(tmp_path / REPO_ID / name)
            for name in (f"transcoder_all/{transcoder_ids(1)[0]}/params.safetensors", FILENAME)
        )
        asked = list(served.requests)
    torch.testing.assert_close(loaded[0].W_enc, transcoders[0].W_enc)
    assert torch.equal(whole["tokens"], data["tokens"])
    paths = [p for p, _ in asked]
    for file_hash in (params, examples):
        assert f"/v1/reconstructions/{file_hash}" in paths  # the CAS was asked how to rebuild it
        assert not any(p.startswith(f"/blobs/{file_hash}") for p in paths)  # never fetched as one blob
    xorb_reads = [r for p, r in asked if p.startswith("/blobs/") and r]
    assert xorb_reads and any("/xet-read-token/" in p for p in paths)


def test_hf_xets_cas_runtime_error_is_a_hub_error(monkeypatch, tmp_path):
    """hf_xet reports CAS failures as `RuntimeError: Data processing error: CAS service error`: the loader
    must turn it into a HubUnreachableError (which `auto` falls back from), not let it escape."""
    from part3_attribution_graphs.worlds import gemma

    def cas_down(*args, **kwargs):
        raise RuntimeError(
            "Data processing error: CAS service error : Reqwest Error: HTTP status server error"
        )

    monkeypatch.setattr(gemma, "gemmascope_transcoder_loader", cas_down)  # where the download happens
    (tmp_path / REPO_ID).mkdir(parents=True)  # the repository whose revision is resolved first
    with offline_hub(tmp_path), pytest.raises(HubUnreachableError, match="CAS service error") as err:
        load_saes_parallel(RELEASE, transcoder_ids(1), max_workers=1)
    assert err.value.kind == "unexpected answer"


def test_a_gated_403_on_gemma_falls_back_to_the_public_270m_world(toy_world, tmp_path, monkeypatch, capsys):
    """A token and a GPU pick `gemma`; the licence not accepted (403) must fall back to `gemma270m-scope`,
    which needs no token, not straight to the offline world."""
    from part3_attribution_graphs.worlds import gemma, gemma270m

    model, transcoders = toy_world
    write_gemmascope_layout(transcoders, tmp_path, repo_id=REPO_ID)

    def licence_not_accepted(**kwargs):
        raise HubUnreachableError(
            "Could not load google/gemma-3-1b-it: forbidden (HTTP 403)", kind="forbidden"
        )

    monkeypatch.setattr(gemma, "load_gemma_world", licence_not_accepted)
    monkeypatch.setattr(gemma270m, "load_gemma3_270m_offline", lambda **k: (model, {}))
    monkeypatch.setattr(gemma270m_scope, "print_fit_report", lambda *a, **k: None)
    monkeypatch.setattr(registry, "has_270m_weights", lambda: True)
    monkeypatch.setattr(
        registry, "choose_world", lambda w: ("gemma", "token and GPU") if w == "auto" else (w, "")
    )
    with offline_hub(tmp_path, cache_dir=tmp_path / "hf"):
        name, _, loaded = registry.load_world("auto", device="cpu")
    assert name == "gemma270m-scope" and sorted(loaded) == sorted(transcoders)
    assert "forbidden" in capsys.readouterr().out


def test_the_readme_says_what_auto_falls_back_to():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    said = [
        line for line in readme.splitlines() if "auto" in line and ("falls back" in line or "picks" in line)
    ]
    assert said
    for line in said:
        assert "`toy`" not in line.split("falls back")[-1].split("(")[0], line


# ------------------------------------------------------------------ row 9: captive portals and proxies


@pytest.mark.parametrize("captive, kind", [("page", "not the hub"), ("407", "proxy")])
def test_a_captive_portal_or_proxy_is_not_the_hub(tmp_path, captive, kind):
    with offline_hub(tmp_path) as served:
        assert hub.hub_reachable()
        served.captive = captive
        assert not hub.hub_reachable()
        name, why = registry.choose_world("auto")
        with pytest.raises(
            HubUnreachableError, match="captive portal" if kind == "not the hub" else "407"
        ) as err:
            hub.check_hub("the transcoders")
    assert name == registry.OFFLINE_WORLD and "out of reach" in why
    assert err.value.kind == kind


# ------------------------------------------------------------------ row 10: lying hosts, corrupt headers


def test_a_range_answered_from_another_offset_is_refused_and_not_cached(schema_file, tmp_path):
    root, path, data = schema_file
    cache = tmp_path / "c.db"
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with offline_hub(root) as served:
        served.range_shift, served.range_shift_from = 16, data_start  # the header is honest, rows are not
        with pytest.raises(HubUnreachableError, match="answer holds bytes") as err:
            _load(cache=cache)
        assert err.value.kind == "unexpected answer"
        served.range_shift = 0
        _assert_rows(_load(cache=cache), data)  # nothing wrong was kept


def test_a_header_whose_shape_overruns_its_offsets_is_refused(tmp_path):
    data = real_example_schema(64, 50, k=8)
    (path,) = write_example_files({LAYER: data}, tmp_path, repo_id=REPO_ID)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["activations"]["shape"] = [64, 9]  # one column more than its bytes hold
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n :])
    with offline_hub(tmp_path), pytest.raises(HubUnreachableError, match="'activations'") as err:
        _load(features=[1, 2], n_examples=None, cache=tmp_path / "c.db")
    assert "data_offsets" in str(err.value)


# ------------------------------------------------------------------ row 11: a trickling host


def _within(load, wait_s: float) -> tuple[list, float]:
    """Run `load` on a daemon thread for at most `wait_s` seconds (a stuck one is left behind): its outcome
    ("loaded" or the HubUnreachableError it raised) and the seconds waited; fails if it was still running."""
    outcome: list = []

    def run():
        try:
            load()
            outcome.append("loaded")
        except HubUnreachableError as err:
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    thread.join(wait_s)
    elapsed = time.perf_counter() - t0
    assert outcome, f"still running {elapsed:.0f} s in, well past its deadline"
    return outcome, elapsed


def test_a_trickling_host_is_given_up_on_at_the_deadline(schema_file, monkeypatch):
    root, _, _ = schema_file
    monkeypatch.setattr(hub, "REQUEST_DEADLINE_S", 1.5)
    with offline_hub(root) as served:
        served.trickle_s = 0.2  # one byte every 0.2 s: no read timeout ever fires
        outcome, elapsed = _within(lambda: _load(cache=False), 10)
    assert isinstance(outcome[0], HubUnreachableError) and outcome[0].kind == "network"
    assert "deadline" in str(outcome[0]) and elapsed < 10


# ------------------------------------------------------------ issue 25 item 6: a wall-clock download deadline


def test_a_trickling_download_is_stopped_at_the_deadline_and_auto_falls_back(
    toy_world, tmp_path, monkeypatch, capsys
):
    """A transfer that trickles (one byte every 2 s: no read timeout fires, a file takes minutes) is stopped
    at `P3AG_DOWNLOAD_DEADLINE_S` on the wall clock, its partial file removed, as a "network" failure that
    `auto` falls back from. Today's code checks its deadline only between attempts: it waits for minutes."""
    from part3_attribution_graphs.worlds import gemma270m

    model, transcoders = toy_world
    write_gemmascope_layout({0: transcoders[0]}, tmp_path, repo_id=REPO_ID)
    cache = tmp_path / "hf"
    monkeypatch.setenv("P3AG_DOWNLOAD_DEADLINE_S", "3")
    with offline_hub(tmp_path, cache_dir=cache) as served:
        served.trickle_s = 2.0

        outcome, elapsed = _within(
            lambda: load_saes_parallel(RELEASE, transcoder_ids(1), max_workers=1), 3 + 10
        )
        partial = list(cache.rglob("*.incomplete"))

        monkeypatch.setattr(gemma270m, "load_gemma3_270m_offline", lambda **k: (model, {}))
        monkeypatch.setattr(
            registry, "choose_world", lambda w: ("gemma270m-scope", "t") if w == "auto" else (w, "")
        )
        name, _, _ = registry.load_world("auto", device="cpu")
    assert isinstance(outcome[0], HubUnreachableError) and outcome[0].kind == "network", outcome[0]
    assert "deadline" in str(outcome[0]) and elapsed < 3 + 10
    assert partial == []  # the killed transfer's `.incomplete` blob is gone
    assert name == registry.OFFLINE_WORLD and "deadline" in capsys.readouterr().out


def test_a_trickling_download_into_local_dir_is_stopped_and_its_partial_file_removed(tmp_path, monkeypatch):
    """The same deadline for a whole example file downloaded into `local_dir` (huggingface_hub keeps that
    partial file under `local_dir/.cache/huggingface/download/`)."""
    write_example_files({LAYER: real_example_schema(64, 50, k=8)}, tmp_path / "hub", repo_id=REPO_ID)
    monkeypatch.setenv("P3AG_DOWNLOAD_DEADLINE_S", "3")
    with offline_hub(tmp_path / "hub") as served:
        served.trickle_s = 2.0

        outcome, _ = _within(
            lambda: load_example_data(
                LAYER, model_size="270m", instruction_tuned=False, local_dir=tmp_path / "mine"
            ),
            3 + 10,
        )
        partial = list((tmp_path / "mine").rglob("*.incomplete"))
    assert isinstance(outcome[0], HubUnreachableError) and outcome[0].kind == "network", outcome[0]
    assert "deadline" in str(outcome[0]) and partial == []


def test_the_download_deadline_setting_is_checked():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("P3AG_DOWNLOAD_DEADLINE_S", "soon")
        with pytest.raises(ValueError, match="P3AG_DOWNLOAD_DEADLINE_S"):
            hub.download_deadline_s()
        mp.setenv("P3AG_DOWNLOAD_DEADLINE_S", "1800")
        assert hub.download_deadline_s() == 1800.0


# ------------------------------------------------------------ issue 25 item 11: one load, one commit


def test_the_fake_hub_answers_revisions_as_huggingface_hub_expects(toy_world, tmp_path):
    """huggingface_hub's own client against the fake: `model_info(revision=)` names the commit, an unknown
    revision is `RevisionNotFoundError` (from `X-Error-Code`), and an old commit's sha still downloads the
    old bytes after `main` moved on."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RevisionNotFoundError
    from safetensors.torch import load_file

    first, second = real_example_schema(64, 50, k=8, seed=1), real_example_schema(64, 50, k=8, seed=2)
    write_example_files({LAYER: first}, tmp_path, repo_id=REPO_ID)
    with offline_hub(tmp_path, cache_dir=tmp_path / "hf") as served:
        api = HfApi(endpoint=served.endpoint, token=False)
        old = api.model_info(REPO_ID, revision="main").sha
        served.reupload(REPO_ID, FILENAME, second)
        new = api.model_info(REPO_ID, revision="main").sha
        assert old != new == served.commit(REPO_ID) and api.model_info(REPO_ID, revision=old).sha == old
        with pytest.raises(RevisionNotFoundError):
            api.model_info(REPO_ID, revision="no-such-branch")
        kw = {"endpoint": served.endpoint, "cache_dir": tmp_path / "hf", "token": False}
        at_old = load_file(hf_hub_download(REPO_ID, FILENAME, revision=old, **kw))
        at_main = load_file(hf_hub_download(REPO_ID, FILENAME, **kw))
    assert torch.equal(at_old["activations"], first["activations"])
    assert torch.equal(at_main["activations"], second["activations"])


def test_transcoders_and_example_data_of_one_load_come_from_one_commit(toy_world, tmp_path, monkeypatch):
    """A re-upload to `main` between the transcoders' download and the example data's must not mix
    commits: the example data of that load is read at the commit the transcoders came from (or at the one
    the user pins). Today's code resolves `main` separately for each, so it reads the re-uploaded file."""
    _, transcoders = toy_world
    root = tmp_path / "hub"
    first, second = real_example_schema(1024, 2000, seed=1), real_example_schema(1024, 2000, seed=2)
    write_gemmascope_layout({0: transcoders[0]}, root, repo_id=REPO_ID)
    write_example_files({0: first}, root, repo_id=REPO_ID)
    kw = {
        "model_size": "270m",
        "instruction_tuned": False,
        "features_by_layer": {0: FEATURES},
        "n_examples": 20,
    }
    with offline_hub(root, cache_dir=tmp_path / "hf") as served:
        pinned = served.commit(REPO_ID)
        loaded = load_saes_parallel(RELEASE, transcoder_ids(1), max_workers=1)
        served.reupload(REPO_ID, example_file_path(0), second)  # main moves on mid-load
        same_load = load_example_data_parallel([0], range_cache=tmp_path / "c.db", transcoders=loaded, **kw)
        _assert_rows(same_load[0], first)  # the transcoders' commit, not the re-upload
        first_load = [p for p, _ in served.requests if "/resolve/" in p]
        fresh = load_example_data_parallel([0], range_cache=tmp_path / "c.db", **kw)  # a new load: new main
        explicit = load_example_data_parallel([0], range_cache=False, revision=pinned, **kw)
        monkeypatch.setenv("P3AG_HUB_REVISION", pinned)
        from_setting = load_example_data_parallel([0], range_cache=False, **kw)
    assert loaded[0].cfg.metadata.hub_revision == pinned
    assert first_load and all(f"/resolve/{pinned}/" in p for p in first_load), first_load
    for got in (explicit, from_setting):
        _assert_rows(got[0], first)
    _assert_rows(fresh[0], second)


# ------------------------------------------------------------------ row 12: an unusable cache file


@pytest.mark.parametrize("damage", ["a directory", "not a database", "under a file"])
def test_an_unusable_range_cache_is_a_miss_with_a_warning_naming_it(schema_file, tmp_path, damage):
    root, _, data = schema_file
    cache = tmp_path / "ranges.sqlite"
    if damage == "a directory":
        cache.mkdir()
    elif damage == "not a database":
        cache.write_bytes(b"\x00garbage" * 100)
    else:
        (tmp_path / "file").write_text("x")
        cache = tmp_path / "file" / "ranges.sqlite"
    with offline_hub(root), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _load(cache=cache)
    _assert_rows(got, data)
    assert any(str(cache) in str(w.message) and "cannot be used" in str(w.message) for w in caught)


# ------------------------------------------------------------------ row 14: the quantisation, as documented


@pytest.mark.gemma270m
def test_the_documented_quantisation_is_the_gguf_files():
    """The README, the notebook and the world's docstring name exactly the tensor types of the PyPI GGUF."""
    import re
    from pathlib import Path

    import gguf

    from part3_attribution_graphs.worlds import gemma270m

    reader = gguf.GGUFReader(str(gemma270m.assemble_gguf()))
    stored = {t.tensor_type.name for t in reader.tensors} - {"F32"}
    root = Path(__file__).resolve().parents[1]
    for text in (
        (root / "README.md").read_text(),
        (root / "notebook_source" / "attribution_graphs.md").read_text(),
        gemma270m_scope.__doc__,
    ):
        assert "4-bit" not in text
        assert set(re.findall(r"\bQ\d_(?:K|0|1)\b", text)) == stored


def test_retry_after_in_seconds_or_as_a_date_and_nonsense_backs_off():
    from email.utils import formatdate
    from types import SimpleNamespace

    def answer(value):
        return SimpleNamespace(headers={"Retry-After": value} if value is not None else {})

    assert hub._retry_wait(answer("7"), 0) == 7.0
    assert 8 <= hub._retry_wait(answer(formatdate(time.time() + 10, usegmt=True)), 0) <= 10
    for value in ("soon", None):
        assert 0.5 <= hub._retry_wait(answer(value), 0) <= 0.625  # backoff: 0.5 s, jittered
