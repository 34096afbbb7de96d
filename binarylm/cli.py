"""The `binarylm` command: one small function per verb.

    binarylm demo [--minutes 10]                       the whole path on built-in data, with a report
    binarylm pretrain [--config configs/x.yaml] [--resume] [--train.lr 3e-4 ...]
    binarylm finetune sft --finetune.base runs/demo [--finetune.lora_rank 8] [--resume]
    binarylm chat --checkpoint runs/demo/sft [--system "You are terse."]
    binarylm generate --checkpoint runs/demo "def main("
    binarylm eval --checkpoint runs/demo
    binarylm convert runs/demo exported/ --to hf       (or --to gguf / binarylm; sources in any of them)
    binarylm info llama-1b                             (a preset, a YAML recipe, a checkpoint or HF directory)
    binarylm quantize -c runs/demo -o runs/demo-int8 --scheme int8   (every loader reads the result)
    binarylm serve -c runs/demo --port 8000            (OpenAI-compatible /v1/completions)
    binarylm explore -c runs/demo                      (the model explorer in the browser)
    binarylm tokenizer train [INPUT ...] --vocab-size 8192 --output tokenizer.json
    binarylm tokenizer encode --tokenizer tokenizer.json "some text"
    binarylm tokenizer decode --tokenizer tokenizer.json 1 2 3
    binarylm tokenizer stats  --tokenizer tokenizer.json [INPUT ...]

Errors caused by the input (a wrong path, a bad value) print one line that
says what to fix, and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from binarylm.errors import BinaryLMError

THREADS_HELP = ("PyTorch CPU threads (0: PyTorch's default, one per core); 1 is often far faster when "
                "other jobs share the cores")
CORPUS_HELP = "text files or directories; none (or 'stdlib') means the built-in standard-library corpus"


def tokenizer_train(args: argparse.Namespace) -> None:
    from binarylm.data.sources import ReadStats, text_source
    from binarylm.tokenizer import save, train_bpe

    stats = ReadStats()
    started = time.perf_counter()
    texts = text_source(args.inputs, split=_split_for(args, "train"), stats=stats)
    specials = args.special_tokens.split(",") if args.special_tokens else []
    tokenizer = train_bpe(texts, args.vocab_size, args.pattern, specials, progress=not args.quiet)
    save(tokenizer, args.output)
    seconds = time.perf_counter() - started
    print(stats.report(), file=sys.stderr)
    print(f"trained {tokenizer.vocab_size} tokens ({len(tokenizer.merges)} merges, "
          f"{len(tokenizer.special_tokens)} special) in {seconds:.1f} s -> {args.output}")


def tokenizer_encode(args: argparse.Namespace) -> None:
    from binarylm.tokenizer import open_tokenizer

    tokenizer = open_tokenizer(args.tokenizer)
    text = _text_argument(args)
    allowed = "all" if args.allow_special else frozenset()
    ids = tokenizer.encode(text, allowed_special=allowed)
    if args.show:
        print(json.dumps([tokenizer.id_to_token(i) for i in ids], ensure_ascii=False))
    print(" ".join(map(str, ids)))


def tokenizer_decode(args: argparse.Namespace) -> None:
    from binarylm.tokenizer import open_tokenizer

    tokenizer = open_tokenizer(args.tokenizer)
    try:
        ids = [int(i) for i in " ".join(args.ids).replace(",", " ").split()]
    except ValueError:
        raise BinaryLMError("token ids must be whole numbers separated by spaces or commas") from None
    sys.stdout.write(tokenizer.decode(ids) + "\n")


def tokenizer_stats(args: argparse.Namespace) -> None:
    from binarylm.data.sources import text_source
    from binarylm.tokenizer import cl100k_base, open_tokenizer

    text = "".join(text_source(args.inputs, split=_split_for(args, "val")))
    n_bytes = len(text.encode("utf-8"))
    if n_bytes == 0:
        raise BinaryLMError("the text to measure is empty; give a non-empty file")
    rows = [("ours", open_tokenizer(args.tokenizer))]
    try:
        rows.append(("cl100k_base", cl100k_base()))
    except BinaryLMError as missing:
        print(f"(no cl100k_base to compare with: {missing})", file=sys.stderr)
    print(f"{'tokenizer':<14}{'vocab':>9}{'tokens':>12}{'bytes/token':>13}")
    for label, tokenizer in rows:
        n_tokens = len(tokenizer.encode_ordinary(text))
        print(f"{label:<14}{tokenizer.vocab_size:>9}{n_tokens:>12}{n_bytes / max(n_tokens, 1):>13.3f}")


def pretrain(args: argparse.Namespace) -> None:
    from binarylm.config import parse_overrides
    from binarylm.train.pretrain import pretrain as run_pretrain

    config = _run_config(args.config, parse_overrides(args.overrides), args.resume)
    metrics = run_pretrain(config, resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


def finetune(args: argparse.Namespace) -> None:
    from binarylm.config import parse_overrides
    from binarylm.train.classify import classify
    from binarylm.train.dpo import dpo
    from binarylm.train.rlhf import grpo, ppo, reward
    from binarylm.train.sft import sft

    stages = {"sft": sft, "classify": classify, "dpo": dpo, "reward": reward, "ppo": ppo, "grpo": grpo}
    config = _run_config(args.config, parse_overrides(args.overrides), args.resume)
    metrics = stages[args.stage](config, resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


def _run_config(path: str | None, overrides: dict[str, str], resume: bool):
    """The config for a run: the recipe plus overrides, or on --resume the checkpoint's own config."""
    from binarylm.config import build_config, load_config

    if not resume:
        return load_config(path, overrides)
    from binarylm.checkpoint import resolve_checkpoint

    fixed = sorted(k for k in overrides if not k.startswith("train."))
    if fixed:
        raise BinaryLMError(
            f"--resume continues the saved run, whose model and data settings cannot change ({', '.join(fixed)}); "
            "drop those options, or start a new run in another --train.out_dir"
        )
    fresh = load_config(path, overrides)
    saved = json.loads((resolve_checkpoint(fresh.train.out_dir) / "config.json").read_text())
    return build_config(saved, overrides)


def generate(args: argparse.Namespace) -> None:
    from binarylm.checkpoint import load_checkpoint
    from binarylm.infer.generate import GenerationConfig
    from binarylm.infer.generate import generate as run_generate

    saved = load_checkpoint(args.checkpoint, device=args.device)
    settings = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop_strings=args.stop or [], truncate_prompt=args.truncate_prompt,
    )
    sys.stdout.write(args.prompt)
    result = run_generate(saved.model, saved.tokenizer, args.prompt, settings,
                          on_text=lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    print(f"\n[{result.finish_reason}: {len(result.token_ids)} tokens]", file=sys.stderr)


def evaluate(args: argparse.Namespace) -> None:
    from binarylm.eval.run import EvalPlan, run_plan

    benchmarks = dict(_name_and_path(spec) for spec in args.task or ())
    builtin = [task for task in (args.builtin or "").split(",") if task]
    plan = EvalPlan(texts=args.text or [], benchmarks=benchmarks, custom=args.custom or [], builtin=builtin,
                    few_shot=args.few_shot, limit=args.limit, seed=args.seed, stride=args.stride,
                    max_tokens=args.max_tokens, builtin_examples=args.builtin_examples)
    plan.held_out = args.held_out or not (plan.texts or plan.benchmarks or plan.custom or plan.builtin)
    results = run_plan(args.checkpoint, plan, device=args.device, show=lambda text: print(text, file=sys.stderr))
    print(json.dumps(results["held_out"] if list(results) == ["held_out"] else results, indent=2))


def _name_and_path(spec: str) -> tuple[str, str]:
    name, separator, path = spec.partition("=")
    if not separator or not name or not path:
        raise BinaryLMError(f"--task {spec!r}: write NAME=PATH, e.g. --task hellaswag=data/hellaswag_val.jsonl")
    return name, path


def report(args: argparse.Namespace) -> None:
    from binarylm.eval.report import report_card

    markdown, html = report_card([Path(run) for run in args.runs], Path(args.out) if args.out else None)
    print(f"report card: {markdown} and {html}")


def scaling(args: argparse.Namespace) -> None:
    from binarylm.eval.scaling import DEFAULT_BUDGETS, scaling_report

    print(scaling_report([Path(run) for run in args.runs], Path(args.out), budgets=args.budget or DEFAULT_BUDGETS))


def convert(args: argparse.Namespace) -> None:
    from binarylm.interop.convert import convert as run_convert

    written = run_convert(args.source, args.output, args.to, gguf_dtype=args.dtype)
    print(f"wrote {args.to} -> {written}")


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from binarylm.checkpoint import load_checkpoint, resolve_checkpoint
    from binarylm.infer.engine import Engine
    from binarylm.serve.app import create_app
    from binarylm.serve.explorer import ExplorerSettings
    from binarylm.serve.loading import LoadingApp
    from binarylm.serve.runner import EngineRunner

    settings = _server_settings(args)
    resolve_checkpoint(args.checkpoint)  # a wrong path fails here, not as a server that never gets ready
    if args.threads:  # on a machine shared with other jobs, fewer threads than cores is often much faster
        import torch

        torch.set_num_threads(args.threads)
    _log_access_to_stderr()
    runners: list[EngineRunner] = []

    def load():
        saved = load_checkpoint(args.checkpoint, device=args.device)
        engine = Engine(saved.model, saved.tokenizer, max_batch=args.max_batch, pack_weights=not args.no_packed_weights)
        runners.append(EngineRunner(engine).start())
        name = args.model_name or saved.path.parent.name or saved.path.name or "binarylm"
        print(f"serving {saved.path} as {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
        print(f"model explorer: http://{args.host}:{args.port}/explore", file=sys.stderr)
        explorer = ExplorerSettings(checkpoint=saved.path, max_prompt_tokens=args.explore_max_tokens)
        return create_app(runners[0], saved.tokenizer, name, settings, explorer)

    print(f"loading {args.checkpoint} (GET /health answers 503 until it is ready)", file=sys.stderr)
    try:  # on SIGTERM / Ctrl-C uvicorn stops accepting and lets in-flight streams finish for up to 30 s
        uvicorn.run(LoadingApp(load), host=args.host, port=args.port, log_level="warning", lifespan="off",
                    timeout_graceful_shutdown=30)
    finally:
        for runner in runners:
            runner.stop()


def explore(args: argparse.Namespace) -> None:
    """`binarylm serve` on this machine, and the explorer page opened in the browser once the model is loaded."""
    serve_args = build_parser().parse_args(["serve", "--checkpoint", args.checkpoint, "--port", str(args.port),
                                            "--device", args.device, "--threads", str(args.threads),
                                            "--explore-max-tokens", str(args.explore_max_tokens)])
    if not args.no_browser:
        import threading

        url = f"http://127.0.0.1:{args.port}"
        threading.Thread(target=_open_when_ready, args=(url,), name="binarylm-browser", daemon=True).start()
    serve(serve_args)


def _open_when_ready(url: str, wait_s: float = 600.0) -> None:
    """Open `url`/explore in the browser as soon as `url`/health answers 200 (the model is loaded)."""
    import urllib.request
    import webbrowser

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    webbrowser.open(f"{url}/explore")
                    return
        except OSError:  # not listening yet, or 503 while loading
            pass
        time.sleep(0.25)


def _server_settings(args: argparse.Namespace):
    from binarylm.serve.security import ServerSettings, load_api_keys

    settings = ServerSettings(
        api_keys=load_api_keys(args.api_key_file), max_body_bytes=args.max_body_bytes, max_waiting=args.max_waiting,
        requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute,
        cors_origins=args.cors_origin or [],
        public_paths=("/health",) if args.protect_metrics else ("/health", "/metrics"),
    )
    if not settings.api_keys and args.host not in ("127.0.0.1", "localhost", "::1") and not args.no_auth:
        raise BinaryLMError(f"refusing to serve on {args.host} without API keys: set BINARYLM_API_KEYS or "
                            "--api-key-file, or pass --no-auth if the network in front of it is trusted")
    return settings


def _log_access_to_stderr() -> None:
    access = logging.getLogger("binarylm.access")  # one JSON line per request
    access.setLevel(logging.INFO)
    access.addHandler(logging.StreamHandler())
    access.propagate = False


def quantize(args: argparse.Namespace) -> None:
    from binarylm.model.quant import quantize_checkpoint

    report = quantize_checkpoint(args.checkpoint, args.output, args.scheme, args.group_size, args.skip or ())
    print(f"{report['scheme']}: {report['layers']} layers, model.safetensors {report['bytes_before'] / 2**20:.1f} MiB "
          f"-> {report['bytes_after'] / 2**20:.1f} MiB ({report['ratio']:.0%} of the size) -> {report['output']}")


def info(args: argparse.Namespace) -> None:
    from binarylm.model.summary import format_summary, model_summary

    config = _model_config_of(args.target, args.overrides)
    summary = model_summary(config)
    print(json.dumps(summary, indent=2) if args.json else format_summary(config, summary))


def _model_config_of(target: str, override_args: list[str]):
    """The ModelConfig named by a preset, a YAML recipe, a checkpoint / run directory or a HF directory."""
    from pathlib import Path

    from binarylm.config import PRESETS, build_config, load_config, parse_overrides, suggest

    overrides = parse_overrides(override_args)
    path = Path(target)
    if path.is_dir():
        from binarylm.interop.convert import detect_format

        if detect_format(path) == "hf":
            from binarylm.interop.hf import model_config_from_hf

            hf_config, _ = model_config_from_hf(json.loads((path / "config.json").read_text()), str(path))
            return build_config({"model": vars(hf_config)}, overrides).model
        from binarylm.checkpoint import resolve_checkpoint

        saved = json.loads((resolve_checkpoint(path) / "config.json").read_text())
        return build_config({"model": saved["model"]}, overrides).model
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return load_config(path, overrides).model
    if target in PRESETS:
        return build_config({"model": {"preset": target}}, overrides).model
    raise BinaryLMError(f"{target!r}{suggest(target, PRESETS)} is neither a preset ({', '.join(PRESETS)}), "
                        "a YAML recipe, nor a checkpoint or Hugging Face directory")


def demo(args: argparse.Namespace) -> None:
    from binarylm.demo import run_demo

    report = run_demo(minutes=args.minutes, out_dir=args.out_dir, progress=not args.quiet,
                      post_minutes=args.post_minutes)
    print(f"report: {report}")


def _split_for(args: argparse.Namespace, builtin_default: str) -> str:
    """The --split asked for; by default a part of the built-in corpus, or all of the user's files."""
    if args.split:
        return args.split
    return builtin_default if not args.inputs or args.inputs == ["stdlib"] else "all"


def _text_argument(args: argparse.Namespace) -> str:
    if args.file:
        from binarylm.data.sources import text_source

        return "".join(text_source([args.file]))
    if args.text is None:
        raise BinaryLMError("nothing to encode: give the text as an argument or use --file PATH")
    return args.text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binarylm", description="BinaryLM: build a language model from scratch.")
    verbs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_verbs(verbs)
    tok = verbs.add_parser("tokenizer", help="train and use byte-level BPE tokenizers")
    tok_verbs = tok.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = tok_verbs.add_parser("train", help="train a BPE tokenizer on text")
    train.add_argument("inputs", nargs="*", help=CORPUS_HELP)
    train.add_argument("--vocab-size", type=int, default=8192, help="total ids, special tokens included")
    train.add_argument("--pattern", default="gpt4", help="split pattern: gpt4, gpt2, or a regex")
    train.add_argument("--special-tokens", default="<|endoftext|>,<|pad|>,<|im_start|>,<|im_end|>",
                       help="comma-separated special tokens, given the last ids")
    train.add_argument("--split", choices=["train", "val", "all"],
                       help="which files to use (default: the built-in corpus' train part, or all given files)")
    train.add_argument("--output", "-o", default="tokenizer.json", help="where to write the tokenizer")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=tokenizer_train, command_parser=train)

    tokenizer_help = "tokenizer.json, its directory, a .tiktoken file, or cl100k_base"
    encode = tok_verbs.add_parser("encode", help="print the token ids of a text")
    encode.add_argument("text", nargs="?", help="the text (or use --file)")
    encode.add_argument("--file", help="encode the contents of this file")
    encode.add_argument("--tokenizer", "-t", required=True, help=tokenizer_help)
    encode.add_argument("--allow-special", action="store_true", help="turn special-token text into special ids")
    encode.add_argument("--show", action="store_true", help="also print each token's text")
    encode.set_defaults(run=tokenizer_encode, command_parser=encode)

    decode = tok_verbs.add_parser("decode", help="print the text of token ids")
    decode.add_argument("ids", nargs="+", help="token ids, separated by spaces or commas")
    decode.add_argument("--tokenizer", "-t", required=True, help=tokenizer_help)
    decode.set_defaults(run=tokenizer_decode, command_parser=decode)

    stats = tok_verbs.add_parser("stats", help="bytes per token on a text, beside cl100k_base")
    stats.add_argument("inputs", nargs="*", help=CORPUS_HELP)
    stats.add_argument("--tokenizer", "-t", required=True, help=tokenizer_help)
    stats.add_argument("--split", choices=["train", "val", "all"],
                       help="which files to measure (default: the built-in corpus' val part, or all given files)")
    stats.set_defaults(run=tokenizer_stats, command_parser=stats)
    return parser


def _add_run_verbs(verbs) -> None:
    demo_verb = verbs.add_parser("demo", help="tokenizer, pretraining, evaluation and samples on built-in data")
    demo_verb.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget for the whole demo")
    demo_verb.add_argument("--out-dir", default="runs/demo", help="where the run and its report go")
    demo_verb.add_argument("--post-minutes", type=float, default=None,
                           help="the part of --minutes for post-training (SFT then DPO on the built-in tasks); "
                                "default 30%%, 0 skips it")
    demo_verb.add_argument("--quiet", action="store_true", help="no progress bars")
    demo_verb.set_defaults(run=demo, command_parser=demo_verb)

    train = verbs.add_parser(
        "pretrain", help="pretrain a model (settings: --SECTION.KEY VALUE, e.g. --train.lr 3e-4)",
        epilog="Any config field can be set as --model.KEY, --data.KEY or --train.KEY. "
               "Run under `torchrun --nproc-per-node N` for data-parallel training.")
    _add_run_options(train, "configs/demo.yaml")
    train.set_defaults(run=pretrain, command_parser=train, takes_overrides=True)

    tune = verbs.add_parser(
        "finetune", help="post-train a checkpoint: sft, classify, dpo, reward, ppo or grpo",
        epilog="Start from a checkpoint with --finetune.base DIR. Without --finetune.data the built-in verifiable "
               "tasks are used (--finetune.tasks arithmetic,reverse,...). --finetune.lora_rank 8 trains LoRA "
               "adapters on a frozen base; add --finetune.quantize_base int8 (or int4) for QLoRA.")
    tune.add_argument("stage", choices=["sft", "classify", "dpo", "reward", "ppo", "grpo"],
                      help="sft: supervised fine-tuning on chats; classify: a class head on the last token; "
                           "dpo: direct preference optimisation; reward: a "
                           "reward model on preference pairs; ppo: RL against a reward model or the task checkers; "
                           "grpo: group-relative policy optimisation with the task checkers")
    _add_run_options(tune, "configs/sft.yaml")
    tune.set_defaults(run=finetune, command_parser=tune, takes_overrides=True)

    from binarylm.chat import add_chat_parser

    add_chat_parser(verbs)

    gen = verbs.add_parser("generate", help="continue a prompt with a trained model, streaming")
    gen.add_argument("prompt", nargs="?", default="", help="the text to continue (empty: start a new document)")
    gen.add_argument("--checkpoint", "-c", required=True, help="a run directory or one of its ckpt-* folders")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (1: all)")
    gen.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    gen.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    gen.add_argument("--truncate-prompt", choices=["error", "left"], default="error",
                     help="what to do with a prompt longer than the context")
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(run=generate, command_parser=gen)

    ev = verbs.add_parser("eval", help="bits per byte beside xz, benchmarks, custom and built-in tasks",
                          epilog="With no task named, the run's held-out text is evaluated. Results go to "
                                 "CKPT/eval.json and CKPT/eval/NAME.json, every example's output to "
                                 "CKPT/eval/NAME.samples.jsonl; `binarylm report RUN` turns them into a report card.")
    ev.add_argument("--checkpoint", "-c", required=True, help="a run directory or one of its ckpt-* folders")
    ev.add_argument("--held-out", action="store_true", help="also evaluate the run's held-out text")
    ev.add_argument("--max-tokens", type=int, default=0, help="held-out text: at most this many tokens (0: all)")
    ev.add_argument("--text", action="append", metavar="FILE", help="loss and bits per byte of a text file")
    ev.add_argument("--stride", type=int, help="--text: sliding-window step in tokens (default: half the context)")
    ev.add_argument("--task", action="append", metavar="NAME=PATH",
                    help="a benchmark from a local file: hellaswag, arc, mmlu, piqa, winogrande or gsm8k")
    ev.add_argument("--custom", action="append", metavar="TASK.yaml", help="a task described in YAML")
    ev.add_argument("--builtin", metavar="TASKS", help="built-in tasks, e.g. arithmetic,reverse,upper,count")
    ev.add_argument("--builtin-examples", type=int, default=50, help="held-out prompts per built-in task")
    ev.add_argument("--few-shot", type=int, help="solved examples before each question (default: the task's, or 0)")
    ev.add_argument("--limit", type=int, default=0, help="only the first N examples of each task (0: all)")
    ev.add_argument("--seed", type=int, default=0, help="which few-shot examples are drawn")
    ev.add_argument("--device", default="cpu")
    ev.set_defaults(run=evaluate, command_parser=ev)

    rep = verbs.add_parser("report", help="a report card (markdown + HTML with plots) for runs, side by side")
    rep.add_argument("runs", nargs="+", help="run directories (several: one column each)")
    rep.add_argument("--out", help="the markdown file to write (default: RUN/card.md, or comparison.md beside "
                                   "the runs); the HTML goes next to it")
    rep.set_defaults(run=report, command_parser=rep)

    sca = verbs.add_parser("scaling", help="fit loss against parameters and tokens over runs of several sizes",
                           epilog="Fits L(N, D) = E + A / N^alpha + B / D^beta and gives the compute-optimal "
                                  "split of each budget C = 6 N D.")
    sca.add_argument("runs", nargs="+", help="run directories of different sizes and token counts")
    sca.add_argument("--out", required=True, help="the folder for scaling.md, scaling.html and scaling.png")
    sca.add_argument("--budget", type=float, action="append", help="a compute budget in FLOPs (repeatable)")
    sca.set_defaults(run=scaling, command_parser=sca)

    conv = verbs.add_parser("convert", help="convert a model between BinaryLM, Hugging Face and GGUF",
                            epilog="The source format is recognised from the path: a BinaryLM checkpoint or run "
                                   "directory, a Hugging Face model directory, or a .gguf file.")
    conv.add_argument("source", help="the model to read")
    conv.add_argument("output", help="where to write (a directory; a file for gguf)")
    conv.add_argument("--to", required=True, choices=["binarylm", "hf", "gguf"], help="the format to write")
    conv.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="GGUF tensor type for the matrices")
    conv.set_defaults(run=convert, command_parser=conv)

    srv = verbs.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    srv.add_argument("--checkpoint", "-c", required=True, help="a run directory or one of its ckpt-* folders")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    srv.add_argument("--no-packed-weights", action="store_true",
                     help="on CPU, do not keep a second, MKL-packed copy of the float32 weights for full decode "
                          "steps (it speeds them up and doubles the weights' memory)")
    srv.add_argument("--model-name", help="the name clients use (default: the run directory's name)")
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    srv.add_argument("--api-key-file", help="one API key per line (keys also come from $BINARYLM_API_KEYS)")
    srv.add_argument("--no-auth", action="store_true", help="allow serving beyond localhost without API keys")
    srv.add_argument("--requests-per-minute", type=int, default=0, help="per key (or client); 0: unlimited")
    srv.add_argument("--tokens-per-minute", type=int, default=0, help="prompt + max_tokens per key; 0: unlimited")
    srv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    srv.add_argument("--max-waiting", type=int, default=256, help="queued requests before new ones get 429")
    srv.add_argument("--cors-origin", action="append", help="allow browser calls from this origin (repeatable)")
    srv.add_argument("--protect-metrics", action="store_true", help="require an API key for /metrics too "
                                                                      "(/health always stays public)")
    srv.add_argument("--explore-max-tokens", type=int, default=256,
                     help="the longest prompt the explorer takes (capped by the context)")
    srv.set_defaults(run=serve, command_parser=srv)

    exp = verbs.add_parser("explore", help="look inside a model in the browser (serves it on this machine)",
                           epilog="Starts `binarylm serve` on 127.0.0.1 and opens http://127.0.0.1:PORT/explore: "
                                  "tokens, attention, logit lens, activations, sampling, embeddings, checkpoints.")
    exp.add_argument("--checkpoint", "-c", required=True, help="a run directory or one of its ckpt-* folders")
    exp.add_argument("--port", type=int, default=8000)
    exp.add_argument("--device", default="cpu")
    exp.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    exp.add_argument("--explore-max-tokens", type=int, default=256,
                     help="the longest prompt the explorer takes (capped by the context)")
    exp.add_argument("--no-browser", action="store_true", help="only print the address; open no browser")
    exp.set_defaults(run=explore, command_parser=exp)

    quant = verbs.add_parser("quantize", help="write an int8 or int4 weight-only quantized checkpoint")
    quant.add_argument("--checkpoint", "-c", required=True, help="a checkpoint, run, Hugging Face dir or .gguf")
    quant.add_argument("--output", "-o", required=True, help="the new checkpoint directory")
    quant.add_argument("--scheme", choices=["int8", "int4"], default="int8",
                       help="int8: per output channel; int4: per group of input columns")
    quant.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128 or 256")
    quant.add_argument("--skip", action="append", help="leave layers matching this name pattern in float "
                                                        "(repeatable), e.g. 'lm_head'")
    quant.set_defaults(run=quantize, command_parser=quant)

    inf = verbs.add_parser("info", help="parameters, FLOPs per token and memory of a model",
                           epilog="Change any model field with --model.KEY VALUE, e.g. --model.n_kv_heads 4.")
    inf.add_argument("target", help="a preset name, a YAML recipe, a checkpoint or run directory, or a HF directory")
    inf.add_argument("--json", action="store_true", help="print the figures as JSON")
    inf.set_defaults(run=info, command_parser=inf, takes_overrides=True)


def _add_run_options(parser: argparse.ArgumentParser, example_recipe: str) -> None:
    """--config, --resume and --quiet: the options of every command that trains (settings come as overrides)."""
    parser.add_argument("--config", help=f"a YAML recipe, e.g. {example_recipe}")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.out_dir from its latest checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, and answer a misspelt option with the closest real ones of that command."""
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "takes_overrides", False):
        args.overrides, unknown = unknown, []
    if unknown:
        command = args.command_parser
        known = [option for action in command._actions for option in action.option_strings]
        close = {match for word in unknown for match in difflib.get_close_matches(word.split("=")[0], known, n=2)}
        hint = f"; did you mean {' or '.join(sorted(close))}?" if close else f"; its options are {', '.join(known)}"
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = _parse(build_parser(), argv)
    try:
        args.run(args)
    except BinaryLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
