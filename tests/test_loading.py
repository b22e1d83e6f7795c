"""The real loading code (HF token, SAELens, GemmaScope 2 layout), exercised offline."""

from __future__ import annotations

import pytest
import torch

from part3_attribution_graphs.attribution import attribute
from part3_attribution_graphs.worlds import gemma, hub
from part3_attribution_graphs.worlds.gemma import (
    TRANSCODER_RELEASE,
    HubUnreachableError,
    MissingTokenError,
    format_prompt,
    load_hf_token,
    load_saes_parallel,
    transcoder_ids,
)
from part3_attribution_graphs.worlds.offline_hub import offline_hub, write_gemmascope_layout

PROMPT = format_prompt("What is the opposite of small?", "The opposite of small is **large")


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "find_dotenv", lambda start=None: None)


def test_missing_token_says_what_to_do(no_token):
    with pytest.raises(MissingTokenError) as err:
        load_hf_token()
    msg = str(err.value)
    assert "HF_TOKEN" in msg and ".env" in msg and "make_toy_world" in msg


def test_missing_token_stops_the_world_loader_before_any_download(no_token, monkeypatch):
    monkeypatch.setattr(
        gemma.HookedSAETransformer,
        "from_pretrained_no_processing",
        lambda *a, **k: pytest.fail("tried to download without a token"),
    )
    with pytest.raises(MissingTokenError):
        gemma.load_gemma_world()


def test_token_is_read_from_dotenv(no_token, tmp_path):
    (tmp_path / ".env").write_text("HF_TOKEN=hf_test_123\n")
    assert load_hf_token(tmp_path / ".env") == "hf_test_123"


def test_unreachable_hub_gives_clear_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(gemma.HookedSAETransformer, "from_pretrained_no_processing", offline)
    with pytest.raises(HubUnreachableError) as err:
        gemma.load_gemma_model(token="hf_dummy")
    assert "network" in str(err.value) and "make_toy_world" in str(err.value)

    with offline_hub(tmp_path), pytest.raises(HubUnreachableError, match="make_toy_world"):
        load_saes_parallel(TRANSCODER_RELEASE, transcoder_ids(1), max_workers=1)


def test_gemmascope_layout_round_trips_through_saelens(toy_world, tmp_path):
    """Transcoders saved in the hub's layout come back through SAE.from_pretrained unchanged."""
    model, transcoders = toy_world
    write_gemmascope_layout(transcoders, tmp_path)
    with offline_hub(tmp_path):
        loaded = load_saes_parallel(TRANSCODER_RELEASE, transcoder_ids(model.cfg.n_layers), max_workers=2)

    assert sorted(loaded) == sorted(transcoders)
    x = torch.randn(5, model.cfg.d_model)
    for layer, tc in transcoders.items():
        got = loaded[layer]
        assert type(got).__name__ == "JumpReLUSkipTranscoder"
        # The hook name is corrected to the ln2 output the transcoder was trained on.
        assert got.cfg.metadata.hook_name == f"blocks.{layer}.mlp.hook_in"
        assert got.cfg.metadata.hook_name_out == f"blocks.{layer}.hook_mlp_out"
        # SAELens transposes the hub's (d_in, d_out) skip into its own (d_out, d_in).
        torch.testing.assert_close(got.W_skip, tc.W_skip)
        torch.testing.assert_close(got(x), tc(x))

    # The loaded transcoders give the same graph as the originals.
    ref = attribute(model, transcoders, PROMPT, batch_size=64)
    out = attribute(model, loaded, PROMPT, batch_size=64)
    assert [n.node_id for n in out.graph.nodes] == [n.node_id for n in ref.graph.nodes]
    torch.testing.assert_close(out.adjacency_matrix, ref.adjacency_matrix, rtol=1e-5, atol=1e-6)
