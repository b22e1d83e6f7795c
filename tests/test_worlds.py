"""Worlds and the hub: the token, the quick hub check, `"auto"`, the gemma270m-scope world, example data by
range.

Nothing here reaches the network: the hub is `offline_hub` (files written in the hub's own layout,
served by a loopback HTTP server and SAELens' two download calls substituted), or an endpoint that
refuses or never answers.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import time

import pytest
import torch
from conftest import hook_count

from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.scores import compute_graph_scores
from part3_attribution_graphs.views import examples as examples_mod
from part3_attribution_graphs.views.examples import (
    feature_examples,
    load_example_data,
    load_example_data_parallel,
    make_toy_example_data,
)
from part3_attribution_graphs.worlds import gemma, gemma270m_scope, hub, registry
from part3_attribution_graphs.worlds.gemma270m_scope import REPO_ID, load_gemma270m_scope_world
from part3_attribution_graphs.worlds.hub import HubUnreachableError, check_hub, find_hf_token, load_hf_token
from part3_attribution_graphs.worlds.offline_hub import (
    offline_hub,
    write_example_files,
    write_gemmascope_layout,
)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No token anywhere, the cwd an empty folder."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "find_dotenv", lambda start=None: None)


@contextlib.contextmanager
def silent_endpoint(refuse: bool):
    """A hub endpoint that refuses connections, or accepts them and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if refuse:
        sock.close()
    else:
        sock.listen(8)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # read when called, as set here
            mp.setenv("HF_HUB_OFFLINE", "0")
            yield
    finally:
        sock.close()


# ------------------------------------------------------------------------------------------ the token


def test_empty_token_in_environment_does_not_hide_dotenv(clean_env, monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("HF_TOKEN=hf_from_dotenv\n")
    monkeypatch.setattr(hub, "find_dotenv", lambda start=None: tmp_path / ".env")
    monkeypatch.setenv("HF_TOKEN", "  ")
    assert find_hf_token() == "hf_from_dotenv"
    # ... and it becomes the token huggingface_hub sends.
    hub.use_token(find_hf_token())
    assert __import__("os").environ["HF_TOKEN"] == "hf_from_dotenv"


def test_environment_token_wins_over_dotenv(clean_env, monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("HF_TOKEN=hf_from_dotenv\n")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert find_hf_token(tmp_path / ".env") == "hf_from_env"


def test_non_utf8_dotenv_is_named(clean_env, tmp_path):
    (tmp_path / ".env").write_bytes(b"HF_TOKEN=hf_\xff\xfe\n")
    with pytest.raises(ValueError, match="UTF-8") as err:
        find_hf_token(tmp_path / ".env")
    assert str(tmp_path / ".env") in str(err.value)


def test_dotenv_without_token_is_a_missing_token(clean_env, tmp_path):
    (tmp_path / ".env").write_text("OTHER=1\nHF_TOKEN=\n")
    assert find_hf_token(tmp_path / ".env") is None
    with pytest.raises(hub.MissingTokenError, match="gemma-3-1b-it"):
        load_hf_token(tmp_path / ".env")


# ------------------------------------------------------------------------------------ the hub check


@pytest.mark.parametrize("refuse", [True, False], ids=["refused", "never-answers"])
def test_hub_check_fails_fast_naming_the_offline_worlds(refuse):
    with silent_endpoint(refuse):
        t0 = time.perf_counter()
        with pytest.raises(HubUnreachableError) as err:
            check_hub("the transcoders", timeout=1.0)
        elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, elapsed
    msg = str(err.value)
    assert "toy" in msg and "gemma270m" in msg and "network" in msg


def test_hub_check_is_bounded_even_when_name_lookup_hangs(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def hang(*args, **kwargs):
        time.sleep(10)
        raise socket.gaierror("name lookup gave up")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="no answer within 1 s"):
        check_hub("the transcoders", timeout=1.0)
    assert time.perf_counter() - t0 < 3.0


def test_hub_offline_setting_means_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # after import, as a notebook cell sets it
    assert not hub.hub_reachable()


def test_gemma_world_with_token_but_no_network_fails_in_seconds(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.setattr(
        gemma.HookedSAETransformer,
        "from_pretrained_no_processing",
        lambda *a, **k: pytest.fail("tried to download after the hub check failed"),
    )
    with silent_endpoint(refuse=False):
        t0 = time.perf_counter()
        with pytest.raises(HubUnreachableError, match="gemma270m"):
            gemma.load_gemma_world()
    assert time.perf_counter() - t0 < hub.CHECK_TIMEOUT_S + 2


def test_scope_world_without_network_fails_before_loading_anything(clean_env, monkeypatch):
    from part3_attribution_graphs.worlds import gemma270m

    monkeypatch.setattr(gemma270m, "load_gemma3_270m_offline", lambda **k: pytest.fail("loaded the model"))
    with silent_endpoint(refuse=True), pytest.raises(HubUnreachableError, match="toy"):
        load_gemma270m_scope_world()


# ---------------------------------------------------------------------------------------- "auto"

# (token, GPU, hub answers, 270M weights installed) -> the world "auto" picks
AUTO_CASES = [
    ((True, True, True, True), "gemma"),
    ((True, True, True, False), "gemma"),
    ((True, False, True, True), "gemma270m-scope"),
    ((False, True, True, True), "gemma270m-scope"),
    ((False, False, True, True), "gemma270m-scope"),
    ((False, False, True, False), "planted"),
    ((True, False, True, False), "planted"),
    ((True, True, False, True), "planted"),
    ((True, False, False, True), "planted"),
    ((False, True, False, True), "planted"),
    ((False, False, False, True), "planted"),
]


@pytest.mark.parametrize(
    "case,expected",
    AUTO_CASES,
    ids=[
        "-".join(f"{'' if on else 'no '}{what}" for what, on in zip(("token", "gpu", "hub", "weights"), case))
        for case, _ in AUTO_CASES
    ],
)
def test_auto_picks_the_world(case, expected, monkeypatch):
    token, gpu, reachable, weights = case
    calls = []
    monkeypatch.setattr(registry, "find_hf_token", lambda: "hf_x" if token else None)
    monkeypatch.setattr(registry, "has_gpu", lambda: gpu)
    monkeypatch.setattr(registry, "hub_reachable", lambda: calls.append("hub") or reachable)
    monkeypatch.setattr(registry, "has_270m_weights", lambda: weights)
    name, why = registry.choose_world("auto")
    assert name == expected, why
    assert calls == ["hub"]  # the hub is asked once


def test_named_worlds_are_taken_as_asked_and_typos_rejected(monkeypatch):
    monkeypatch.setattr(registry, "hub_reachable", lambda: pytest.fail("checked the hub for a named world"))
    for name in registry.WORLDS:
        assert registry.choose_world(name)[0] == name
    with pytest.raises(ValueError, match="gemma270m-scope"):
        registry.choose_world("gemma-270m")


def test_auto_falls_back_to_planted_when_the_chosen_hub_world_fails(monkeypatch, capsys):
    monkeypatch.setattr(
        registry, "choose_world", lambda world: ("gemma", "test") if world == "auto" else (world, "")
    )

    def fail(name, device):
        if name == "gemma":
            raise HubUnreachableError("401: no access to google/gemma-3-1b-it")
        return ("model", {0: "tc"})

    monkeypatch.setattr(registry, "_load", fail)
    monkeypatch.setattr(registry, "has_270m_weights", lambda: False)  # with it: gemma270m-scope
    assert registry.load_world("auto", device="cpu") == ("planted", "model", {0: "tc"})
    assert "no access" in capsys.readouterr().out
    with pytest.raises(HubUnreachableError):  # a world named explicitly is not swapped for another
        registry.load_world("gemma", device="cpu")


@pytest.mark.parametrize("world", ["toy", "planted"])
def test_load_world_offline(world):
    """Both offline worlds load by name; "auto" never picks the random toy world, but it stays available."""
    name, model, transcoders = registry.load_world(world, device="cpu")
    assert name == world and sorted(transcoders) == list(range(model.cfg.n_layers))
    assert registry.OFFLINE_WORLD == "planted" and "toy" in registry.WORLD_NAMES


# ----------------------------------------------------------------------------- the gemma270m-scope world


def test_scope_world_loads_through_saelens(toy_world, tmp_path, monkeypatch, capsys):
    """The loader, on the toy model, with the toy transcoders written as `google/gemma-scope-2-270m-pt` has
    them."""
    from part3_attribution_graphs.worlds import gemma270m

    model, transcoders = toy_world
    monkeypatch.setattr(gemma270m, "load_gemma3_270m_offline", lambda **k: (model, {}))
    write_gemmascope_layout(transcoders, tmp_path, repo_id=REPO_ID)
    with offline_hub(tmp_path) as served:
        got_model, loaded = load_gemma270m_scope_world(max_workers=2)
    assert got_model is model and sorted(loaded) == sorted(transcoders)
    assert any(path.startswith("/api/") for path, _ in served.requests)  # the hub check went to the server
    for layer, tc in transcoders.items():
        assert type(loaded[layer]).__name__ == "JumpReLUSkipTranscoder"
        assert loaded[layer].cfg.metadata.hook_name == f"blocks.{layer}.mlp.hook_in"
        torch.testing.assert_close(loaded[layer].W_skip, tc.W_skip)
    out = capsys.readouterr().out
    assert "L0 listed" in out and "Q4_K_M" in out
    # The printed L0 is the one the transcoders give on the lesson prompt.
    report = gemma270m_scope.fit_report(model, loaded)
    assert 1 <= report[0]["l0"] <= transcoders[0].cfg.d_sae and 0 <= report[0]["fvu"]
    assert hook_count(model) == 0


def test_listed_l0_comes_from_saelens():
    listed = gemma270m_scope.listed_l0()
    assert sorted(listed) == list(range(18))
    assert all(10 <= v <= 20 for v in listed.values()), listed  # "small": 10-20 latents per token


# ------------------------------------------------------------------------------- example data by range


@pytest.fixture(scope="module")
def big_example_file(tmp_path_factory):
    """One examples.safetensors at GemmaScope 2's width: 16,384 latents, 256 examples each, 8,192 sequences
    of 512 tokens (about 67 MB; the real file has 1,000 examples and 237k sequences)."""
    gen = torch.Generator().manual_seed(0)
    F, K, N, T = 16384, 256, 8192, 512
    acts = torch.rand(F, K, generator=gen).sort(dim=1, descending=True).values
    acts[:, 200:] = 0.0  # unused slots
    data = {
        "activations": acts,
        "seq_ids": torch.randint(N, (F, K), generator=gen, dtype=torch.int32),
        "positions": torch.randint(T, (F, K), generator=gen, dtype=torch.int32),
        "feature_frequencies": torch.rand(F, generator=gen),
        "top_tokens": torch.randint(262144, (F, 10), generator=gen, dtype=torch.int32),
        "top_logits": torch.randn(F, 10, generator=gen),
        "bottom_tokens": torch.randint(262144, (F, 10), generator=gen, dtype=torch.int32),
        "bottom_logits": torch.randn(F, 10, generator=gen),
        "tokens": torch.randint(262144, (N, T), generator=gen, dtype=torch.int32),
    }
    root = tmp_path_factory.mktemp("hub")
    (path,) = write_example_files({7: data}, root, repo_id=REPO_ID)
    return root, path, data


def test_example_rows_by_range_read_a_few_mb_not_the_file(big_example_file, tmp_path):
    root, path, data = big_example_file
    features = torch.randperm(16384, generator=torch.Generator().manual_seed(1))[:50].sort().values.tolist()
    cache = tmp_path / "ranges.sqlite"
    with offline_hub(root) as served:
        got = load_example_data(
            7, model_size="270m", instruction_tuned=False, features=features, n_examples=20, range_cache=cache
        )
        first = served.bytes_sent
        resolved = [path for path, _ in served.requests if "/resolve/" in path]
        asked = len(served.requests)
        again = load_example_data(
            7, model_size="270m", instruction_tuned=False, features=features, n_examples=20, range_cache=cache
        )
        second = served.bytes_sent - first
        asked_again = [path for path, _ in served.requests[asked:]]
        served.ignore_range_under_gzip = True  # a CDN that ignores Range when gzip is allowed
        gzip_host = load_example_data(
            7, model_size="270m", instruction_tuned=False, features=features, n_examples=20, range_cache=False
        )
        third = served.bytes_sent - first - second
    file_size = path.stat().st_size
    n_seq = got["tokens"].shape[0]
    needed = 50 * (3 * 20 * 4 + 4 + 4 * 10 * 4) + n_seq * 512 * 4
    print(
        f"file {file_size / 2**20:.1f} MiB; read {first / 2**20:.2f} MiB for 50 latents and {n_seq} "
        f"sequences (exactly needed {needed / 2**20:.2f} MiB); again from the cache: {second} bytes"
    )
    print(f"from a host that ignores Range under gzip: {third / 2**20:.2f} MiB")
    assert first < 1.5 * needed + 2**16 and first < 0.05 * file_size
    assert third < 1.5 * needed + 2**16  # still the rows, not the file
    assert len(resolved) == 1  # after the hub's first redirect, ranges go straight to its storage URL
    # the hub's redirect names the file's ETag: the header and rows come from the cache, nothing from storage;
    # the hub is asked only for the revision's commit (a few hundred bytes of JSON) and the redirect
    assert not [p for p in asked_again if p.startswith("/blobs/")] and second < 1024, asked_again

    # The same rows and sequences as reading the whole file from disk.
    whole = load_example_data(
        7,
        model_size="270m",
        instruction_tuned=False,
        features=features,
        n_examples=20,
        local_dir=root / REPO_ID,
    )
    for key in whole:
        assert torch.equal(got[key], whole[key]), key
        assert torch.equal(again[key], whole[key]), key
        assert torch.equal(gzip_host[key], whole[key]), key
    for key in ("top_tokens", "feature_frequencies"):
        assert torch.equal(got[key], data[key][features]), key
    f = features[3]  # its strongest example, shown from the subset, is the corpus text around it
    top = feature_examples(got, f, None, n_examples=1)[0]
    seq, pos = int(data["seq_ids"][f, 0]), int(data["positions"][f, 0])
    assert top["token_ids"] == data["tokens"][seq, max(0, pos - 12) : pos + 5].tolist()


def test_example_data_parallel_by_range_on_a_real_graph(toy_world, tmp_path):
    """The notebook's call: the latents of a pruned graph, read by range from a hub-layout folder."""
    model, transcoders = toy_world
    result = attribute(model, transcoders, gemma270m_scope.LESSON_PROMPT, batch_size=64)
    wanted = examples_mod.features_in_graph(result)
    full = make_toy_example_data(model, transcoders, n_sequences=64)
    write_example_files(full, tmp_path, repo_id=REPO_ID)
    with offline_hub(tmp_path) as served:
        got = load_example_data_parallel(
            range(model.cfg.n_layers),
            model_size="270m",
            instruction_tuned=False,
            features_by_layer=wanted,
            n_examples=8,
            range_cache=tmp_path / "c.db",
        )
        none = load_example_data(
            0, model_size="270m", instruction_tuned=False, features=[], range_cache=tmp_path / "c.db"
        )
    assert none["activations"].shape == (0, full[0]["activations"].shape[1]) and none["tokens"].shape[0] == 0
    assert served.bytes_sent < sum(p.stat().st_size for p in tmp_path.rglob("examples.safetensors"))
    for layer, feats in wanted.items():
        assert got[layer]["feature_ids"].tolist() == feats
        torch.testing.assert_close(got[layer]["activations"], full[layer]["activations"][feats, :8])
        for f in feats[:3]:
            (top,) = feature_examples(got[layer], f, None, n_examples=1)  # seq ids are renumbered in a subset
            (ref,) = feature_examples(full[layer], f, None, n_examples=1)
            assert (top["token_ids"], top["peak"], top["max_act"]) == (
                ref["token_ids"],
                ref["peak"],
                ref["max_act"],
            )


def test_example_data_by_range_without_network_fails_fast(tmp_path):
    with silent_endpoint(refuse=True):
        t0 = time.perf_counter()
        with pytest.raises(HubUnreachableError, match="toy"):
            load_example_data_parallel(
                [0, 1], features_by_layer={0: [1], 1: [2]}, range_cache=tmp_path / "c.db"
            )
        assert time.perf_counter() - t0 < 5


def test_example_data_missing_file_says_which(tmp_path):
    with offline_hub(tmp_path), pytest.raises(HubUnreachableError, match="layer_3_width_16k"):
        load_example_data(3, features=[1], range_cache=tmp_path / "c.db")


# ------------------------------------------------------------------------ the world at full 270M shapes


@pytest.mark.gemma270m
def test_scope_world_at_full_270m_shapes(tmp_path, capsys):
    """Real 270M weights; random transcoders at the real shapes (640 x 16,384, 18 layers) in the hub's layout,
    through SAELens; a short graph with a capped top_k."""
    from part3_attribution_graphs.worlds import gemma270m

    model, _ = gemma270m.load_gemma3_270m_offline()
    written = gemma270m_scope.write_random_transcoders(tmp_path, model)
    del model
    assert len(written) == 18
    try:
        with offline_hub(tmp_path):
            model, transcoders = load_gemma270m_scope_world()
        assert sorted(transcoders) == list(range(18))
        for layer, tc in transcoders.items():
            assert tuple(tc.W_enc.shape) == (640, 16384) and tuple(tc.W_skip.shape) == (640, 640)
            assert tc.cfg.metadata.hook_name == f"blocks.{layer}.mlp.hook_in"
        from safetensors.torch import load_file

        stored = load_file(str(written[5]))
        torch.testing.assert_close(transcoders[5].W_skip, stored["affine_skip_connection"].T)
        torch.testing.assert_close(transcoders[5].W_enc, stored["w_enc"])
        report = capsys.readouterr().out
        assert "L0 listed" in report
        l0 = gemma270m_scope.fit_report(model, transcoders)
        assert all(5 <= r["l0"] <= 30 for r in l0.values()), l0  # thresholds were set for ~15 on this prompt

        prompt = gemma.format_prompt("Write me a short rhyming couplet.", "The sky is dark")
        result = attribute(model, transcoders, prompt, top_k=3, batch_size=128)
        scores = compute_graph_scores(result)
        assert torch.isfinite(result.adjacency_matrix).all()
        assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
        assert hook_count(model) == 0
    finally:
        for path in written:
            path.unlink()
        shutil.rmtree(tmp_path / ".hf_cache", ignore_errors=True)  # the copies huggingface_hub downloaded
