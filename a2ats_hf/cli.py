"""The ``a2ats`` command: ``calibrate`` builds codebooks (and can push them to the Hub), ``download`` fetches
them, ``generate`` decodes with them, ``eval`` runs the evaluation suite."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _load(model_path: str, device: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import a2ats_hf  # noqa: F401  (registers "a2ats")

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, attn_implementation="a2ats")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(model_path)


def _topk(value: str) -> float | int:
    from .cache import check_topk

    try:
        topk = float(value) if any(c in value for c in ".eE") else int(value)
        check_topk(topk)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return topk


def calibrate_command(args: argparse.Namespace) -> None:
    from .calibration import calibrate

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
    from .hub_utils import resolve

    print(resolve(args.repo, subfolder=args.subfolder, revision=args.revision))


def generate_command(args: argparse.Namespace) -> None:
    from .cache import A2ATSCache, cache_argument
    from .codebooks import Codebooks
    from .scoring import DistanceBuckets

    if args.buckets_per_octave is not None and args.scoring != "distance":
        raise SystemExit("--buckets-per-octave applies to --scoring distance only")
    scoring = args.scoring if args.buckets_per_octave is None else DistanceBuckets(per_octave=args.buckets_per_octave)
    model, tokenizer = _load(args.model, args.device, args.dtype)
    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    messages = [{"role": "user", "content": prompt}]
    if tokenizer.chat_template and not args.raw:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    cache = A2ATSCache(Codebooks.from_pretrained(args.codebooks or args.model), topk=args.topk, budget=args.budget,
                        scoring=scoring)
    out = model.generate(**inputs.to(args.device), **cache_argument(model, cache), max_new_tokens=args.max_new_tokens,
                         do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    memory = cache.memory_footprint()
    print(
        f"[a2ats] attended {cache.stats.attended_fraction:.1%} of past tokens per step "
        f"(far tokens retrieved: {cache.stats.far_fraction:.1%}); cache holds "
        f"{memory['device_bytes'] / 2**20:.1f} MiB on {args.device}, {memory['cpu_bytes'] / 2**20:.1f} MiB on the CPU",
        file=sys.stderr,
    )


def eval_command(args: argparse.Namespace) -> None:
    import json

    from .codebooks import Codebooks
    from .evaluation import Method, evaluate, evaluate_perplexity

    model, tokenizer = _load(args.model, args.device, args.dtype)
    books = Codebooks.from_pretrained(args.codebooks or args.model)
    methods = [Method()] + [Method(s, t, b) for s in args.scoring for t in args.topk for b in args.budget
                            if s != "window"] + ([Method("window")] if "window" in args.scoring else [])
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
    parser = argparse.ArgumentParser(prog="a2ats", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="model directory or Hub id")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--dtype", default="float32" if not torch.cuda.is_available() else "bfloat16")

    cal = sub.add_parser("calibrate", parents=[common], help="build codebooks from text files")
    cal.add_argument("--text", nargs="+", required=True, help="UTF-8 text files to calibrate on")
    cal.add_argument("--out", help="directory to write the codebooks to")
    cal.add_argument("--push-to-hub", metavar="REPO", help="upload the codebooks into REPO/a2ats (one commit)")
    cal.add_argument("--n-centroids", type=int, default=4096)
    cal.add_argument("--max-tokens", type=int, default=65536)
    cal.add_argument("--chunk-size", type=int, default=8192)
    cal.add_argument("--uuid-tokens", type=int, default=16384)
    cal.add_argument("--kmeans-iters", type=int, default=100)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--queries", choices=["wrope", "distance"], default="wrope",
                     help='queries weighting the error: windowed RoPE (default) or those of scoring="distance"')
    cal.set_defaults(func=calibrate_command)

    down = sub.add_parser("download", help="fetch a repository's codebooks into the Hugging Face cache")
    down.add_argument("repo")
    down.add_argument("--subfolder", default="a2ats")
    down.add_argument("--revision")
    down.set_defaults(func=download_command)

    gen = sub.add_parser("generate", parents=[common], help="answer a prompt with A2ATS decoding")
    gen.add_argument("--codebooks", help="codebooks directory or Hub repository (default: the model's a2ats/ folder)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--prompt-file")
    gen.add_argument("--topk", type=_topk, default=0.03, help="fraction in (0, 1] or int token budget")
    gen.add_argument("--budget", choices=["query_head", "kv_head"], default="query_head")
    gen.add_argument("--scoring", choices=["wrope", "distance"], default="wrope", help="how far tokens are scored")
    gen.add_argument("--buckets-per-octave", type=int, metavar="P",
                     help="distance buckets per doubling of the distance (default 1; 4 ranks better for 5-14%% more decode time)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.set_defaults(func=generate_command)

    from .evaluation.tasks import TASKS
    from .scoring import SCORERS

    ev = sub.add_parser("eval", parents=[common], help="RULER-style retrieval tasks (and perplexity with attention fidelity): full attention vs A2ATS and baselines")
    ev.add_argument("--haystack", nargs="+", required=True, help="UTF-8 prose files the needles hide in")
    ev.add_argument("--codebooks", help="codebooks directory or Hub repository (default: the model's a2ats/ folder)")
    ev.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ev.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192])
    ev.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    ev.add_argument("--samples", type=int, default=1, help="seeds per (task, length, depth)")
    ev.add_argument("--scoring", nargs="+", choices=sorted(SCORERS),
                    default=["wrope", "distance", "oracle", "quest", "random", "window"])
    ev.add_argument("--topk", nargs="+", type=_topk, default=[0.03])
    ev.add_argument("--budget", nargs="+", choices=["query_head", "kv_head"], default=["query_head"])
    ev.add_argument("--batch-size", type=int, default=8, help="prompts answered together")
    ev.add_argument("--perplexity", nargs="+", metavar="FILE",
                    help="held-out UTF-8 text: also the perplexity of the last --tail tokens of windows of each length, "
                         "with the recall, attention mass and output error of every method against full attention")
    ev.add_argument("--windows", type=int, default=2, help="windows of each length for --perplexity")
    ev.add_argument("--tail", type=int, default=512, help="tokens predicted at the end of each window")
    ev.add_argument("--out", help="JSON file for every answer and the summary")
    ev.set_defaults(func=eval_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "calibrate" and not (args.out or args.push_to_hub):
        parser.error("calibrate needs --out DIR and/or --push-to-hub REPO")
    args.func(args)


if __name__ == "__main__":
    main()
