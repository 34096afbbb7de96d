"""The model explorer: what a trained model computes for a prompt, captured in one forward pass.

explore/ computes (no HTTP here); serve/ exposes it at POST /v1/internals and serves the web
page at /explore (docs/explorer.md). The contract between the two sides:

Arrays travel as {"shape": [..], "dtype": "float32", "data": base64 of the little-endian float32
bytes}, which the page reads straight into a Float32Array: a 64-token prompt's attention in every
layer and head is a few hundred thousand numbers, too many to print as JSON text in under a second.

POST /v1/internals  {"prompt": str} or {"ids": [int, ...]}, optional "checkpoint" (a name from
GET /v1/explore/checkpoints; default the served one), "top_k" (logit-lens entries per cell, 1-20,
default 5). The reply:

    checkpoint    "ckpt-000800"
    config        {n_layer, n_head, n_kv_heads, head_dim, d_model, d_ff, vocab_size, context_length,
                   position, norm, mlp}
    tokens        [{"id", "text", "bytes"}]: each token's id, its text (decoded alone, invalid UTF-8
                  shown as U+FFFD), and its bytes as hex ("e282ac")
    embeddings    {"token": Array (T, C), "position": Array (T, C) or null (rotary/none),
                   "sum": Array (T, C), the residual stream entering layer 0}
    layers        one per block:
        attention     {"raw": q k^T (H, T, T), "scaled": raw / sqrt(head_dim) (H, T, T),
                       "masked": scaled with -inf above the diagonal (and outside a sliding window),
                       "softmax": the attention weights (H, T, T); rows sum to 1, masked entries 0}
        q, k, v       Array (H, T, head_dim) each, after rotary embedding where the model uses it
                      (k and v repeated to H heads for grouped-query attention)
        mlp           Array (T, d_ff): the MLP's hidden activations after the nonlinearity
                      (SwiGLU: silu(gate) * up; mixture of experts: null)
        residual_norm {"input", "after_attention", "output"}: L2 norm of the residual stream per
                      position, [T] each
        logit_lens    {"ids": [[T][k]], "texts": [[T][k]], "probs": [[T][k]]}: the final norm and the
                      output head applied to this layer's output; the last layer's equals the model's
                      own prediction
    next_token    {"logits": Array (V,) at the last position (raw, so the page applies temperature,
                   top-k and top-p itself), "ids": the 200 likeliest ids, "texts": their texts}
    timing_ms     server-side time to compute the reply

GET /v1/explore/embeddings[?checkpoint=NAME]  {"xy": Array (V, 2), "texts": [V], "explained": [2]}:
    every token embedding projected on the first two principal components, with the share of
    variance each explains.
GET /v1/explore/checkpoints  {"run": name, "served": "ckpt-...", "checkpoints": ["ckpt-...", ...]}
GET /v1/explore/curves       {"train": [{"step", "tokens", "loss", "lr"}], "val": [{"step", "tokens", "loss"}]}

Where each reply is built (everything but `checkpoint`, `timing_ms`, `run` and `served`, which the server adds):

    internals.internals(model, tokenizer, ids, top_k=5)   POST /v1/internals (BinaryLMError for a bad request)
    embeddings.embedding_map(model, tokenizer)             GET /v1/explore/embeddings (cacheable per checkpoint)
    runs.checkpoint_names(run_dir)                         the "checkpoints" list, oldest first
    runs.training_curves(run_dir)                          GET /v1/explore/curves ("tokens" and "lr" may be null:
                                                           fine-tuning runs log no token count)
    arrays.encode_array(tensor) / arrays.decode_array(d)   the Array encoding, both ways
"""
