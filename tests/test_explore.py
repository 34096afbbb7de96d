"""The explorer's data (binarylm/explore) against direct computation with the model's own modules."""

import base64
import json
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from binarylm.checkpoint import load_checkpoint
from binarylm.config import build_config
from binarylm.errors import BinaryLMError
from binarylm.explore.arrays import decode_array, encode_array
from binarylm.explore.embeddings import embedding_map
from binarylm.explore.internals import CONFIG_FIELDS, _Recorder, internals
from binarylm.explore.runs import checkpoint_names, training_curves
from binarylm.foundations.attention import causal_mask
from binarylm.model import Transformer
from binarylm.model.positions import apply_rotary, rotary_tables
from binarylm.model.quant import quantize_checkpoint

TEXT = "def greet(name):\n    return f'hello, {name}!'  # a € sign"
ARCHITECTURES = {
    "gpt2": {"preset": "tiny"},
    "llama": {"preset": "llama-tiny"},  # rotary, RMSNorm, SwiGLU, 4 query heads over 2 key/value heads
    "window": {"preset": "llama-tiny", "sliding_window": 4, "n_kv_heads": 1},
    "sinusoidal-moe": {"preset": "tiny", "position": "sinusoidal", "n_experts": 4},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two on a busy two-core machine wait on each other at every op."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(tokenizer, **fields) -> Transformer:
    config = build_config({"model": {"vocab_size": tokenizer.vocab_size, **fields}})
    torch.manual_seed(0)
    return Transformer(config.model).eval()


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def explored(request, small_tokenizer):
    """(model, ids, reply, reference) for one architecture; the reference is computed block by block."""
    model = make_model(small_tokenizer, **ARCHITECTURES[request.param])
    ids = small_tokenizer.encode(TEXT)
    return model, ids, internals(model, small_tokenizer, ids, top_k=3), reference(model, ids)


@torch.no_grad()
def reference(model: Transformer, ids: list[int]) -> dict:
    """Every block's input, attention output, MLP activation and output, by calling the modules one by one."""
    T, config = len(ids), model.config
    positions = torch.arange(T)  # (T,)
    x = model.token_embedding(torch.tensor(ids))  # (T, C)
    if config.position == "learned":
        x = x + model.position_embedding(positions)
    elif config.position == "sinusoidal":
        x = x + sinusoids(T, config.d_model)
    rotary = rotary_tables(positions, config) if config.position == "rope" else None
    x = x[None]  # (1, T, C)
    blocks = [dict(embedded=x[0])]
    for block in model.blocks:
        attended = block.attn(block.norm1(x), rotary)  # (1, T, C)
        middle = x + attended  # (1, T, C)
        up = block.mlp.up(block.norm2(middle)) if hasattr(block.mlp, "up") else None
        hidden = None if up is None else (F.silu(block.mlp.gate(block.norm2(middle))) * up if config.mlp == "swiglu"
                                          else F.gelu(up, approximate="tanh"))
        output = block(x, rotary)  # (1, T, C)
        blocks.append(dict(input=x[0], attended=attended[0], middle=middle[0], output=output[0],
                           hidden=None if hidden is None else hidden[0],
                           qkv=block.attn.qkv(block.norm1(x))[0]))
        x = output
    return dict(embedded=blocks[0]["embedded"], blocks=blocks[1:], rotary=rotary,
                logits=model(torch.tensor([ids]))[0][0])  # (T, V)


def sinusoids(length: int, width: int) -> torch.Tensor:
    """(T, C) the original transformer's table, written out: sin(p / 10000^(2i/C)) at 2i, cos at 2i + 1."""
    position, dim = np.arange(length)[:, None], np.arange(width)[None, :]  # (T, 1), (1, C)
    angle = position / 10000 ** (2 * (dim // 2) / width)  # (T, C)
    return torch.from_numpy(np.where(dim % 2 == 0, np.sin(angle), np.cos(angle))).float()


def close(array, expected, atol=1e-5):
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    np.testing.assert_allclose(array, expected, rtol=1e-4, atol=atol)


# ------------------------------------------------------------------ the reply's shape


def test_reply_has_the_contract_shape(explored, small_tokenizer):
    model, ids, reply, _ = explored
    c, T = model.config, len(ids)
    assert set(reply) == {"config", "tokens", "embeddings", "layers", "next_token"}
    assert reply["config"] == {name: getattr(c, name) for name in CONFIG_FIELDS}
    assert [token["id"] for token in reply["tokens"]] == ids
    assert len(reply["layers"]) == c.n_layer
    for layer in reply["layers"]:
        assert set(layer) == {"attention", "q", "k", "v", "mlp", "residual_norm", "logit_lens"}
        assert all(decode_array(a).shape == (c.n_head, T, T) for a in layer["attention"].values())
        assert all(decode_array(layer[name]).shape == (c.n_head, T, c.head_dim) for name in "qkv")
        assert layer["mlp"] is None if c.n_experts else decode_array(layer["mlp"]).shape == (T, c.d_ff)
        assert all(len(norms) == T for norms in layer["residual_norm"].values())
        assert np.shape(layer["logit_lens"]["ids"]) == np.shape(layer["logit_lens"]["probs"]) == (T, 3)
    assert decode_array(reply["next_token"]["logits"]).shape == (c.vocab_size,)
    assert len(reply["next_token"]["ids"]) == len(reply["next_token"]["texts"]) == 200
    json.dumps(reply, allow_nan=False)  # strict JSON: the -inf of masked scores lives only inside arrays


def test_tokens_carry_text_and_bytes(explored, small_tokenizer):
    _, ids, reply, _ = explored
    tokens = reply["tokens"]
    assert bytes.fromhex("".join(token["bytes"] for token in tokens)) == TEXT.encode()
    assert tokens[0] == {"id": ids[0], "text": "def", "bytes": "646566"}
    lone_byte = small_tokenizer.ranks[b"\xe2"]  # the first byte of "€": not UTF-8 on its own
    model = make_model(small_tokenizer, preset="tiny")
    assert internals(model, small_tokenizer, [lone_byte])["tokens"] == [{"id": lone_byte, "text": "\ufffd",
                                                                          "bytes": "e2"}]


# ------------------------------------------------------------------ against the modules, one by one


def test_embeddings_are_the_tables_rows(explored):
    model, ids, reply, ref = explored
    embeddings = reply["embeddings"]
    close(decode_array(embeddings["token"]), model.token_embedding.weight[ids])
    close(decode_array(embeddings["sum"]), ref["embedded"])
    if model.config.position == "learned":
        close(decode_array(embeddings["position"]), model.position_embedding.weight[:len(ids)])
    elif model.config.position == "rope":
        assert embeddings["position"] is None
    else:
        close(decode_array(embeddings["position"]), sinusoids(len(ids), model.config.d_model))


def test_residual_norms_match_the_hidden_states(explored):
    _, _, reply, ref = explored
    for layer, block in zip(reply["layers"], ref["blocks"]):
        for name, stream in (("input", "input"), ("after_attention", "middle"), ("output", "output")):
            close(layer["residual_norm"][name], block[stream].norm(dim=-1), atol=1e-4)


def test_attention_scores_softmax_and_mask(explored):
    model, ids, reply, _ = explored
    T, D, window = len(ids), model.config.head_dim, model.config.sliding_window
    visible = np.broadcast_to(causal_mask(T, window), (model.config.n_head, T, T))
    for layer in reply["layers"]:
        raw, scaled, masked, weights = (decode_array(layer["attention"][name])
                                        for name in ("raw", "scaled", "masked", "softmax"))
        close(raw, decode_array(layer["q"]) @ decode_array(layer["k"]).transpose(0, 2, 1))
        close(scaled, raw / math.sqrt(D))
        assert np.all(masked[~visible] == -np.inf) and np.array_equal(masked[visible], scaled[visible])
        assert np.all(weights[~visible] == 0.0) and np.all(weights[visible] > 0)
        close(weights.sum(axis=-1), np.ones((model.config.n_head, T)))
        close(weights, torch.softmax(torch.from_numpy(masked), dim=-1))
    if window:
        assert not visible[0, -1, 0]  # the window did cut: the last query cannot see the first key


def test_softmax_times_values_is_the_attention_output(explored):
    """Through the module's output projection, the rebuilt pattern gives what the module returned."""
    model, ids, reply, ref = explored
    for block, layer, seen in zip(model.blocks, reply["layers"], ref["blocks"]):
        mixed = torch.from_numpy(decode_array(layer["attention"]["softmax"]) @ decode_array(layer["v"]))  # (H, T, D)
        with torch.no_grad():
            out = block.attn.proj(mixed.transpose(0, 1).reshape(len(ids), -1))  # (T, C)
        close(out.numpy(), seen["attended"])


def test_queries_and_keys_are_rotated_and_shared(explored):
    model, ids, reply, ref = explored
    c, T = model.config, len(ids)
    for layer, seen in zip(reply["layers"], ref["blocks"]):
        q, k, v = seen["qkv"].split([c.n_head * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
        q = q.view(T, c.n_head, c.head_dim).transpose(0, 1)  # (H, T, D)
        k = k.view(T, c.n_kv_heads, c.head_dim).transpose(0, 1)  # (KV, T, D)
        v = v.view(T, c.n_kv_heads, c.head_dim).transpose(0, 1)  # (KV, T, D)
        if c.position == "rope":
            rotated = apply_rotary(q, *ref["rotary"])  # (H, T, D)
            assert not torch.allclose(rotated[:, 1:], q[:, 1:])  # only position 0 is left as it was
            q, k = rotated, apply_rotary(k, *ref["rotary"])
        group = c.n_head // c.n_kv_heads
        close(decode_array(layer["q"]), q)
        for head in range(c.n_head):  # query head h reads key/value head h // group
            close(decode_array(layer["k"])[head], k[head // group])
            close(decode_array(layer["v"])[head], v[head // group])


def test_mlp_activations(explored):
    model, _, reply, ref = explored
    for layer, seen in zip(reply["layers"], ref["blocks"]):
        if model.config.n_experts:
            assert layer["mlp"] is None
        else:
            close(decode_array(layer["mlp"]), seen["hidden"])


def test_logit_lens_ends_at_the_models_prediction(explored):
    model, ids, reply, ref = explored
    for layer, seen in zip(reply["layers"], ref["blocks"]):
        with torch.no_grad():
            probs = torch.softmax(model.lm_head(model.final_norm(seen["output"])), dim=-1)  # (T, V)
        top = probs.topk(3, dim=-1)
        assert layer["logit_lens"]["ids"] == top.indices.tolist()
        close(layer["logit_lens"]["probs"], top.values)
    own = torch.softmax(ref["logits"], dim=-1).topk(3, dim=-1)  # (T, 3): the model's own prediction
    assert reply["layers"][-1]["logit_lens"]["ids"] == own.indices.tolist()
    assert reply["layers"][-1]["logit_lens"]["probs"] == own.values.tolist()  # the same numbers, not just close


def test_next_token_is_the_models_last_logits(explored, small_tokenizer):
    model, ids, reply, ref = explored
    next_token = reply["next_token"]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0, -1]  # (V,)
    assert np.array_equal(decode_array(next_token["logits"]), logits.numpy())
    assert next_token["ids"] == logits.topk(200).indices.tolist()
    assert next_token["texts"][0] == small_tokenizer.decode([next_token["ids"][0]])


# ------------------------------------------------------------------ the model is left as it was


def test_mode_and_hooks_are_restored(small_tokenizer):
    model = make_model(small_tokenizer, preset="llama-tiny").train()
    internals(model, small_tokenizer, [1, 2, 3], next_ids=5)
    assert model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_other_threads_are_not_recorded():
    layer = torch.nn.Linear(2, 2)
    recorder = _Recorder()
    recorder.outputs(layer, "out")
    thread = threading.Thread(target=layer, args=(torch.ones(1, 2),))
    thread.start()
    thread.join()
    assert recorder.seen == {}
    layer(torch.ones(1, 2))
    assert "out" in recorder.seen
    recorder.remove()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_checkpoint(base, tmp_path, small_tokenizer, scheme):
    quantize_checkpoint(base, tmp_path / scheme, scheme, group_size=32)
    checkpoint = load_checkpoint(tmp_path / scheme)
    ids = small_tokenizer.encode(TEXT)
    reply = internals(checkpoint.model, checkpoint.tokenizer, ids)
    with torch.no_grad():
        logits = checkpoint.model(torch.tensor([ids]))[0][0]  # (T, V)
    assert np.array_equal(decode_array(reply["next_token"]["logits"]), logits[-1].numpy())
    assert reply["layers"][-1]["logit_lens"]["ids"] == torch.softmax(logits, -1).topk(5).indices.tolist()
    weights = decode_array(reply["layers"][0]["attention"]["softmax"])
    close(weights.sum(axis=-1), np.ones(weights.shape[:2]))


# ------------------------------------------------------------------ bad requests


@pytest.mark.parametrize(("ids", "top_k", "message"), [
    ([], 5, "no tokens"),
    (list(range(65)), 5, "more than the model's context of 64"),
    ([1, 2, 1024], 5, "outside the vocabulary"),
    ([-1], 5, "outside the vocabulary"),
    ([1, 2.0], 5, "must be integers"),
    ([True], 5, "must be integers"),
    ("hello", 5, "list of token ids"),
    ([1], 0, "top_k"),
    ([1], 21, "top_k"),
    ([1], 2.5, "top_k"),
])
def test_bad_requests_are_named(small_tokenizer, ids, top_k, message):
    model = make_model(small_tokenizer, preset="tiny", vocab_size=1024)
    with pytest.raises(BinaryLMError, match=message):
        internals(model, small_tokenizer, ids, top_k=top_k)


# ------------------------------------------------------------------ arrays on the wire


def test_arrays_round_trip():
    values = torch.randn(2, 3, 4)
    values[0, 0, 0], values[1, 2, 3] = float("-inf"), float("nan")
    payload = encode_array(values)
    assert payload["shape"] == [2, 3, 4] and payload["dtype"] == "float32"
    assert np.frombuffer(base64.b64decode(payload["data"]), "<f4").tolist()[1:4] == values.flatten()[1:4].tolist()
    np.testing.assert_array_equal(decode_array(json.loads(json.dumps(payload))), values.numpy())
    assert decode_array(encode_array(torch.ones(3, dtype=torch.bfloat16))).tolist() == [1.0, 1.0, 1.0]
    assert decode_array(encode_array(np.arange(3))).dtype == np.float32
    assert decode_array(encode_array(torch.zeros(0, 5))).shape == (0, 5)


@pytest.mark.parametrize("payload", [
    {"shape": [3], "dtype": "float64", "data": ""},
    {"shape": [3], "dtype": "float32", "data": "not base64!"},
    {"shape": [3], "dtype": "float32", "data": base64.b64encode(b"\0" * 8).decode()},
    [1, 2, 3],
])
def test_bad_arrays_are_named(payload):
    with pytest.raises(BinaryLMError):
        decode_array(payload)


# ------------------------------------------------------------------ the embedding map


def test_embedding_map_is_the_principal_plane(small_tokenizer):
    model = make_model(small_tokenizer, preset="tiny")
    reply = embedding_map(model, small_tokenizer)
    V = model.config.vocab_size
    xy = decode_array(reply["xy"])
    assert xy.shape == (V, 2) and len(reply["texts"]) == V
    table = model.token_embedding.weight.detach().double()  # (V, C)
    centred = table - table.mean(dim=0)  # (V, C)
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)  # the tall table's own SVD
    close(reply["explained"], (singular[:2] ** 2 / (singular ** 2).sum()).numpy())
    assert 0 < reply["explained"][1] <= reply["explained"][0] <= 1
    close(np.abs(xy), (centred @ directions[:2].T).abs().numpy(), atol=1e-4)  # the same plane, up to sign
    assert reply["texts"][small_tokenizer.ranks[b"a"]] == "a"


# ------------------------------------------------------------------ runs: checkpoints and curves


def test_checkpoint_names_by_step(tmp_path):
    for name, complete in (("ckpt-000100", True), ("ckpt-1000000", True), ("ckpt-000050", False),
                           (".ckpt-000200.tmp-7", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "config.json").write_text("{}")
    assert checkpoint_names(tmp_path) == ["ckpt-000100", "ckpt-1000000"]
    with pytest.raises(BinaryLMError, match="does not exist"):
        checkpoint_names(tmp_path / "missing")


def test_training_curves_tolerate_missing_fields(tmp_path):
    assert training_curves(tmp_path) == {"train": [], "val": []}
    records = [
        {"step": 0, "split": "before", "accuracy": 0.0},
        {"step": 1, "split": "train", "loss": 9.0, "lr": 1e-4, "tokens": 100},
        {"step": 20, "split": "train", "loss": 5.0, "lr": 1e-3},  # fine-tuning: no token count
        {"step": 10, "split": "train", "loss": 7.0, "lr": 5e-4, "tokens": 1000},
        {"step": 10, "split": "val", "accuracy": 0.5},  # a task score, no loss
        {"step": 20, "split": "val", "loss": 6.0, "tokens": 2000, "perplexity": 403.4},
        {"step": 20, "split": "train", "loss": 4.5, "lr": 1e-3},  # logged again after a resume: this one wins
        {"step": 30, "split": "train", "loss": float("nan")},
        {"split": "train", "loss": 1.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    curves = training_curves(tmp_path)
    assert curves == {
        "train": [{"step": 1, "tokens": 100, "loss": 9.0, "lr": 1e-4}, {"step": 10, "tokens": 1000, "loss": 7.0,
                  "lr": 5e-4}, {"step": 20, "tokens": None, "loss": 4.5, "lr": 1e-3}],
        "val": [{"step": 20, "tokens": 2000, "loss": 6.0}],
    }
    json.dumps(curves, allow_nan=False)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "spl')
    torn = training_curves(tmp_path)["train"]  # the cut-short last line is left out
    assert torn == [{"step": 1, "tokens": None, "loss": 2.0, "lr": None}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "spl\n{"step": 2, "split": "train", "loss": 2.0}\n')
    with pytest.raises(BinaryLMError, match="metrics.jsonl, line 1: malformed JSON"):
        training_curves(tmp_path)
