"""The ``a2ats`` command: ``calibrate`` builds codebooks (and can push them to the Hub), ``download`` fetches
them, ``generate`` decodes with them, ``eval`` runs the evaluation suite."""

# Parsing imports nothing heavy: torch, transformers and the library load inside the commands, so `--help` and
# argument errors answer at once (the library is imported by absolute name, so this module needs nothing of its
# package at import time). Errors in what the user gave print as one `a2ats: error: ...` line; A2ATS_DEBUG=1 shows
# their traceback.

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "auto")
# The evaluation suite's tasks and scorers and the default re-ranking factor, named here so that parsing needs no
# import of the library (a test checks them against a2ats_eval.tasks.TASKS, a2ats_hf.scoring.SCORERS and
# a2ats_hf.cache.RERANK).
TASKS = ("niah_word", "niah_number", "niah_uuid", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "variable_tracking", "common_words")
SCORERS = ("distance", "oracle", "postrope", "quest", "random", "window", "wrope")
RERANK = {"query_head": 6, "kv_head": 4}  # a2ats_hf.cache.RERANK, for --rerank's help (the same test checks it)

# Raised by the library, torch, transformers or the Hub for what the user gave (a bad value, a missing file or
# repository, too little memory): one line, no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError, MemoryError, NotImplementedError)


def _int_at_least(low: int):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {number}")
        return number

    parse.__name__ = "int"
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def _n_centroids(value: str) -> int:
    number = _int_at_least(2)(value)
    if number > 65536:
        raise argparse.ArgumentTypeError(f"must lie in [2, 65536] (codes are uint16), got {number}")
    return number


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return number


def _topk(value: str) -> float | int:
    """A fraction in (0, 1] ("0.03", "1e-2") or a positive int token budget ("512"), as A2ATSCache takes it."""
    try:
        topk = float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        topk = None
    if isinstance(topk, int) and topk > 0 or isinstance(topk, float) and 0.0 < topk <= 1.0:
        return topk
    raise argparse.ArgumentTypeError(
        f"must be a fraction in (0, 1] or a positive int token budget, got {value!r}")


def _existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value!r}")
    return value


def _model_or_repo(value: str) -> str:
    """A local directory or a Hub id ("org/name"): what is plainly a path ("/...", "./...", "~/...", "a/b/c") must
    exist."""
    if (value.startswith(("/", ".", "~")) or value.count("/") > 1) and not Path(value).expanduser().exists():
        raise argparse.ArgumentTypeError(f"no such directory: {value!r} (nor is it a Hub id, which reads org/name)")
    return value


def _output_file(value: str) -> str:
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a directory")
    if not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"the directory of {value!r} does not exist")
    return value


def _output_dir(value: str) -> str:
    if Path(value).exists() and not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} exists and is not a directory")
    return value


def _load(model_path: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import a2ats_hf  # noqa: F401  (registers "a2ats")

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, attn_implementation="a2ats")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(model_path)


def _resolve_device(args: argparse.Namespace) -> None:
    """--device checked against this machine (default: cuda where there is one) and --dtype's default for it."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r}: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif getattr(args, "cuda_graphs", False) or getattr(args, "compile_layers", False):
        option = "--cuda-graphs" if args.cuda_graphs else "--compile-layers"
        raise ValueError(f"{option} needs a CUDA --device, got {args.device}")
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"


def calibrate_command(args: argparse.Namespace) -> None:
    from a2ats_hf.calibration import calibrate

    model, tokenizer = _load(args.model, args.device, args.dtype)
    texts = (Path(f).read_text(encoding="utf-8") for f in args.text)
    books = calibrate(
        model,
        tokenizer,
        texts,
        n_centroids=args.n_centroids,
        max_tokens=args.max_tokens,
        chunk_size=args.chunk_size,
        uuid_tokens=args.uuid_tokens,
        kmeans_iters=args.kmeans_iters,
        seed=args.seed,
        queries=args.queries,
    )
    books.calibration["data"] = [Path(f).name for f in args.text]
    if args.out:
        print(f"codebooks written to {books.save_pretrained(args.out)}")
    if args.push_to_hub:
        commit = books.push_to_hub(args.push_to_hub)
        print(f"codebooks pushed to {args.push_to_hub}/a2ats: {getattr(commit, 'commit_url', commit)}")


def download_command(args: argparse.Namespace) -> None:
    from a2ats_hf.hub_utils import resolve

    print(resolve(args.repo, subfolder=args.subfolder, revision=args.revision))


def generate_command(args: argparse.Namespace) -> None:
    from a2ats_hf import A2ATSCache, cache_argument
    from a2ats_hf.codebooks import Codebooks
    from a2ats_hf.scoring import DistanceBuckets

    scoring = args.scoring if args.buckets_per_octave is None else DistanceBuckets(per_octave=args.buckets_per_octave)
    model, tokenizer = _load(args.model, args.device, args.dtype)
    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    messages = [{"role": "user", "content": prompt}]
    if tokenizer.chat_template and not args.raw:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    prompt_tokens = inputs["input_ids"].shape[1]
    cache = A2ATSCache(Codebooks.from_pretrained(args.codebooks or args.model), topk=args.topk, budget=args.budget,
                       scoring=scoring, offload=args.offload, max_length=prompt_tokens + args.max_new_tokens,
                       rerank=args.rerank, gpu_share=args.gpu_share, row_cache=args.row_cache)
    if args.cuda_graphs is not False and model.device.type == "cuda":
        from a2ats_hf.graphs import capture_decoding

        # steps it cannot serve (other scorers) run the model's forward
        capture_decoding(model, compile_layers=args.compile_layers)
    out = model.generate(**inputs.to(args.device), **cache_argument(model, cache), max_new_tokens=args.max_new_tokens,
                         do_sample=False)
    print(tokenizer.decode(out[0, prompt_tokens:], skip_special_tokens=True))
    memory = cache.memory_footprint()
    held = f"; the row cache held {cache.row_cache_hits:.0%} of them" if cache.row_cache else ""
    print(
        f"[a2ats] attended {cache.stats.attended_fraction:.1%} of past tokens per step "
        f"(far tokens retrieved: {cache.stats.far_fraction:.1%}{held}); cache holds "
        f"{memory['device_bytes'] / 2**20:.1f} MiB on {args.device}, {memory['cpu_bytes'] / 2**20:.1f} MiB on the CPU",
        file=sys.stderr,
    )


def eval_command(args: argparse.Namespace) -> None:
    import json

    from a2ats_eval import Method, evaluate, evaluate_perplexity
    from a2ats_hf.codebooks import Codebooks

    model, tokenizer = _load(args.model, args.device, args.dtype)
    books = Codebooks.from_pretrained(args.codebooks or args.model)
    methods = [Method()] + [Method(s, t, b, rerank=r) for s in args.scoring for t in args.topk for b in args.budget
                            for r in args.rerank if s != "window" and (r == 1 or s in ("wrope", "distance"))]
    methods += [Method("window")] if "window" in args.scoring else []
    haystack = "\n".join(Path(f).read_text(encoding="utf-8") for f in args.haystack)
    result = evaluate(model, tokenizer, books, haystack, methods, args.tasks, args.lengths, args.depths,
                      range(args.samples), args.batch_size)
    for key, value in sorted(result["summary"]["mean"].items()):
        relative = result["summary"]["relative_to_full"].get(key)
        print(f"{key}: {value:.3f}" + (f" ({relative:.0%} of full)" if relative is not None else ""))
    if args.perplexity:
        text = "\n".join(Path(f).read_text(encoding="utf-8") for f in args.perplexity)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        result["perplexity"] = evaluate_perplexity(model, books, ids, methods, args.lengths, args.windows, args.tail)
        for row in result["perplexity"]:
            fidelity = "".join(f", {m} {row[m]:.3f}" for m in ("recall", "mass", "output_error") if m in row)
            print(f"{row['method']} | {row['length']}: perplexity {row['perplexity']:.2f}{fidelity}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="a2ats", description=__doc__,
        epilog="Errors print as one line; A2ATS_DEBUG=1 shows their Python traceback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", type=_model_or_repo, help="model directory or Hub id")
    common.add_argument("--device", help="torch device: cpu, cuda, cuda:1, ... (default: cuda where there is one)")
    common.add_argument("--dtype", choices=DTYPES,
                        help='weights\' dtype (default: bfloat16 on CUDA, float32 on the CPU; '
                             '"auto": the checkpoint\'s)')

    cal = sub.add_parser("calibrate", parents=[common], help="build codebooks from text files")
    cal.add_argument("--text", nargs="+", required=True, type=_existing_file, help="UTF-8 text files to calibrate on")
    cal.add_argument("--out", type=_output_dir, help="directory to write the codebooks to")
    cal.add_argument("--push-to-hub", metavar="REPO", help="upload the codebooks into REPO/a2ats (one commit)")
    cal.add_argument("--n-centroids", type=_n_centroids, default=4096, help="centroids per KV head, 2 to 65536")
    cal.add_argument("--max-tokens", type=positive_int, default=65536, help="tokens of the text files to use")
    cal.add_argument("--chunk-size", type=positive_int, default=8192, help="tokens per forward pass")
    cal.add_argument("--uuid-tokens", type=non_negative_int, default=16384, help="tokens of random UUIDs added")
    cal.add_argument("--kmeans-iters", type=positive_int, default=100)
    cal.add_argument("--seed", type=non_negative_int, default=0)
    cal.add_argument("--queries", choices=["wrope", "distance"], default="wrope",
                     help='queries weighting the error: windowed RoPE (default) or those of scoring="distance"')
    cal.set_defaults(func=calibrate_command)

    down = sub.add_parser("download", help="fetch a repository's codebooks into the Hugging Face cache")
    down.add_argument("repo")
    down.add_argument("--subfolder", default="a2ats")
    down.add_argument("--revision")
    down.set_defaults(func=download_command)

    gen = sub.add_parser("generate", parents=[common], help="answer a prompt with A2ATS decoding")
    gen.add_argument("--codebooks", type=_model_or_repo,
                     help="codebooks directory or Hub repository (default: the model's a2ats/ folder)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--prompt-file", type=_existing_file)
    gen.add_argument("--topk", type=_topk, default=0.03, help="fraction in (0, 1] or int token budget")
    gen.add_argument("--budget", choices=["query_head", "kv_head"], default="query_head")
    gen.add_argument("--scoring", choices=["distance", "wrope"], default="distance",
                     help="how far tokens are scored: distance buckets (default) or the paper's windowed RoPE")
    gen.add_argument("--buckets-per-octave", type=positive_int, metavar="P",
                     help="distance buckets per doubling of the distance "
                          "(default 1; 4 ranks better for 5-14%% more decode time)")
    gen.add_argument("--rerank", type=positive_int, metavar="R",
                     help="with the K/V on the GPU (--offload none or auto), re-rank R x the budget by exact q.k "
                          f"(default there {RERANK['query_head']}, {RERANK['kv_head']} with --budget kv_head; "
                          "1: off)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=128)
    gen.add_argument("--offload", choices=["cpu", "none", "auto"], default="cpu",
                     help="where the full K/V lives: CPU memory (default), the GPU, or the GPU while it fits")
    gen.add_argument("--gpu-share", type=_fraction, default=0.0, metavar="F",
                     help="share in [0, 1] of an offloaded layer's selected rows the GPU attends itself, reading "
                          "them from the pinned CPU store over PCIe (default 0: the CPU attends them all; 1: the CPU "
                          "only holds the K/V)")
    gen.add_argument("--row-cache", type=float, default=None, metavar="R",
                     help="budgets (0, or 2 or more) of the rows each offloaded layer picked most recently kept on the "
                          "GPU, where picked again they are attended (default: 2 where layers are offloaded from a GPU "
                          "with room for them, else none; 0: none)")
    gen.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                     help="decode as captured CUDA graphs, in pieces around the CPU attention of offloaded layers "
                          "(default: on a CUDA --device; --cuda-graphs insists, needing one)")
    gen.add_argument("--compile-layers", action="store_true",
                     help="with CUDA graphs, also fuse the model's norms and MLPs with torch.compile (fewer kernels "
                          "a step: faster at small batches; logits may differ from eager in the last bits)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.set_defaults(func=generate_command)

    ev = sub.add_parser("eval", parents=[common],
                        help="RULER-style retrieval tasks (and perplexity with attention fidelity): "
                             "full attention vs A2ATS and baselines")
    ev.add_argument("--haystack", nargs="+", required=True, type=_existing_file,
                    help="UTF-8 prose files the needles hide in")
    ev.add_argument("--codebooks", type=_model_or_repo,
                    help="codebooks directory or Hub repository (default: the model's a2ats/ folder)")
    ev.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ev.add_argument("--lengths", nargs="+", type=positive_int, default=[4096, 8192])
    ev.add_argument("--depths", nargs="+", type=_fraction, default=[0.1, 0.5, 0.9], help="needle depths in [0, 1]")
    ev.add_argument("--samples", type=positive_int, default=1, help="seeds per (task, length, depth)")
    ev.add_argument("--scoring", nargs="+", choices=SCORERS,
                    default=["wrope", "distance", "oracle", "quest", "random", "window"])
    ev.add_argument("--topk", nargs="+", type=_topk, default=[0.03])
    ev.add_argument("--budget", nargs="+", choices=["query_head", "kv_head"], default=["query_head"])
    ev.add_argument("--rerank", nargs="+", type=positive_int, default=[1],
                    help="re-rank R x the budget by exact scores (1: off; A2ATS's scorers only)")
    ev.add_argument("--batch-size", type=positive_int, default=8, help="prompts answered together")
    ev.add_argument("--perplexity", nargs="+", metavar="FILE", type=_existing_file,
                    help="held-out UTF-8 text: also the perplexity of the last --tail tokens of windows of each "
                         "length, with the recall, attention mass and output error of every method against full "
                         "attention")
    ev.add_argument("--windows", type=positive_int, default=2, help="windows of each length for --perplexity")
    ev.add_argument("--tail", type=positive_int, default=512, help="tokens predicted at the end of each window")
    ev.add_argument("--out", type=_output_file, help="JSON file for every answer and the summary")
    ev.set_defaults(func=eval_command)
    return parser


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        message = f"{error.strerror}: {error.filename}"
    else:
        message = str(error).strip() or type(error).__name__
    return re.sub(r"\s*\n\s*", " ", message)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "calibrate" and not (args.out or args.push_to_hub):
        parser.error("calibrate needs --out DIR and/or --push-to-hub REPO")
    if args.command == "generate" and args.buckets_per_octave is not None and args.scoring != "distance":
        parser.error("--buckets-per-octave applies to --scoring distance only")
    if args.command == "generate" and (args.rerank or 1) > 1 and args.offload == "cpu":
        parser.error("--rerank needs the K/V on the GPU (--offload none or auto)")
    if args.command == "generate" and args.compile_layers and args.cuda_graphs is False:
        parser.error("--compile-layers goes with CUDA graphs (not --no-cuda-graphs)")
    if args.command == "generate" and args.gpu_share and args.offload == "none":
        parser.error("--gpu-share splits the rows of offloaded layers: it needs --offload cpu or auto")
    if args.command == "generate" and args.row_cache and not args.row_cache >= 2:
        parser.error(f"--row-cache is 0 (none) or at least 2 budgets, got {args.row_cache:g}")
    if args.command == "generate" and args.row_cache and args.offload == "none":
        parser.error("--row-cache keeps rows of offloaded layers on the GPU: it needs --offload cpu or auto")
    if args.command == "generate" and args.row_cache and args.gpu_share not in (0, 1):
        parser.error("--row-cache takes --gpu-share 0 (the CPU attends the misses) or 1 (the GPU reads them)")
    if args.command == "eval" and args.perplexity and args.tail >= min(args.lengths):
        parser.error(f"--tail {args.tail} must be shorter than every --lengths window (the shortest is "
                     f"{min(args.lengths)})")
    if hasattr(args, "device"):
        try:
            _resolve_device(args)
        except ValueError as error:
            parser.error(str(error))
    debug = os.environ.get("A2ATS_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        parser.exit(130, "a2ats: interrupted\n")
    except USER_ERRORS as error:
        if debug:
            raise
        parser.exit(1, f"a2ats: error: {_one_line(error)}\n")
    except Exception as error:
        torch = sys.modules.get("torch")
        out_of_memory = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None),
                                                                           "OutOfMemoryError", None)
        if debug or out_of_memory is None or not isinstance(error, out_of_memory):
            raise
        parser.exit(1, f"a2ats: error: {_one_line(error)}\n")


if __name__ == "__main__":
    main()
