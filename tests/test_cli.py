"""The `a2ats` command line: calibrate then generate, on a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from a2ats_hf import Codebooks, cli
from a2ats_hf.cli import build_parser, main

from conftest import tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from a2ats_eval.assets import smollm2_path

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def calibrated(model_dir, tmp_path, *extra: str):
    """`a2ats calibrate` on a text file: (the text file, the codebooks directory)."""
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60)
    out = tmp_path / "books"
    main(["calibrate", str(model_dir), "--text", str(text), "--out", str(out), "--n-centroids", "16",
          "--max-tokens", "1500", "--uuid-tokens", "300", "--kmeans-iters", "3", "--device", "cpu", *extra])
    return text, out


@pytest.mark.parametrize("queries", ["wrope", "distance"])
def test_calibrate_then_generate(model_dir, tmp_path, capsys, queries):
    """`a2ats calibrate` writes loadable codebooks (for either scorer); `a2ats generate` answers with that scorer
    and reports what it attended."""
    _, out = calibrated(model_dir, tmp_path, "--queries", queries)
    assert Codebooks.from_pretrained(out).n_centroids == 16
    assert Codebooks.from_pretrained(out).calibration["queries"] == queries
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("A long letter. " * 80)
    buckets = ["--buckets-per-octave", "4"] if queries == "distance" else []
    offload = (["--offload", "none"] if queries == "wrope"  # the K/V beside the model: the GPU's layout
               else ["--gpu-share", "1", "--row-cache", "2"])  # offloaded, the device reading what it misses
    main(["generate", str(model_dir), "--codebooks", str(out), "--prompt-file", str(prompt), "--topk", "0.1",
          "--max-new-tokens", "4", "--device", "cpu", "--scoring", queries, *buckets, *offload])
    err = capsys.readouterr().err
    assert "attended" in err and "MiB" in err
    assert ("the row cache held" in err) == (queries == "distance")


def test_generate_refuses_buckets_without_distance_scoring(model_dir, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", str(model_dir), "--prompt", "hi", "--buckets-per-octave", "4", "--scoring", "wrope",
              "--device", "cpu"])
    assert exit.value.code == 2 and "--scoring distance" in capsys.readouterr().err


def test_eval_runs_the_suite(model_dir, tmp_path, capsys):
    """`a2ats eval` answers the tasks with full attention and the chosen scorers, measures perplexity and fidelity on
    held-out text, and writes every answer and row."""
    text, books = calibrated(model_dir, tmp_path)
    out = tmp_path / "eval.json"
    main(["eval", str(model_dir), "--codebooks", str(books), "--haystack", str(text), "--tasks", "niah_number",
          "--lengths", "600", "--depths", "0.5", "--scoring", "wrope", "distance", "window", "--topk", "0.1",
          "--device", "cpu", "--perplexity", str(text), "--tail", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "full | 600: " in printed and "wrope 0.1 | 600: " in printed and "window | 600" in printed
    assert "wrope 0.1 | 600: perplexity" in printed and "recall" in printed
    result = __import__("json").loads(out.read_text())
    assert len(result["records"]) == 4 and len(result["perplexity"]) == 4
    assert "distance 0.1 | 600: " in printed


def test_generate_rejects_bad_topk(model_dir, capsys):
    """A topk of 0 is refused with a clear message."""
    with pytest.raises(SystemExit) as exit:
        main(["generate", str(model_dir), "--codebooks", "missing", "--prompt", "hi", "--topk", "0"])
    assert exit.value.code == 2 and "argument --topk: must be a fraction in (0, 1]" in capsys.readouterr().err


def test_calibrate_push_to_hub_and_download(model_dir, tmp_path, monkeypatch, capsys):
    """`--push-to-hub` uploads through HfApi in one commit; `a2ats download` resolves from the Hub cache offline."""
    from huggingface_hub import HfApi, constants
    from test_hub_utils import populate_hub_cache

    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, ops, **kw: commits.append((repo_id, ops)))
    text = tmp_path / "text.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich, with a comfortable home. " * 40)
    main(["calibrate", str(model_dir), "--text", str(text), "--push-to-hub", "org/tiny", "--out", str(tmp_path / "b"),
          "--n-centroids", "16", "--max-tokens", "1000", "--uuid-tokens", "200", "--kmeans-iters", "2"])
    assert commits[0][0] == "org/tiny" and len(commits[0][1]) == 3
    assert Codebooks.from_pretrained(tmp_path / "b").calibration["data"] == ["text.txt"]
    populate_hub_cache(tmp_path / "hub", "org/tiny", tmp_path / "b")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    capsys.readouterr()
    main(["download", "org/tiny"])
    assert capsys.readouterr().out.strip().endswith("a2ats")


REPO = Path(__file__).resolve().parents[1]
# The CLI module on its own (as a console script outside the package would load it): main(argv), then what it imported.
STANDALONE = """
import importlib.util, sys, time
started = time.perf_counter()
spec = importlib.util.spec_from_file_location("a2ats_cli", "a2ats_hf/cli.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
try:
    cli.main(sys.argv[1:])
except SystemExit as exit:
    print("exit", exit.code, file=sys.stderr)
print(sorted(m for m in ("torch", "transformers", "a2ats_hf") if m in sys.modules), time.perf_counter() - started)
"""


@pytest.mark.parametrize("args", [["--help"], ["eval", "--help"], ["generate", "m", "--prompt", "x", "--dtype", "foo"]])
def test_help_and_argument_errors_import_nothing_heavy(args):
    """`--help` and argument errors need neither torch nor transformers nor the library: they answer at once."""
    done = subprocess.run([sys.executable, "-c", STANDALONE, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    imported, seconds = done.stdout.splitlines()[-1].rsplit(" ", 1)
    assert imported == "[]" and float(seconds) < 1.0
    assert f"exit {2 if '--dtype' in args else 0}" in done.stderr


def test_installed_help_is_fast():
    """The console command's entry point answers --help without importing torch or transformers."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom a2ats_cli import main\ntry:\n    main(['--help'])\n"
         "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'transformers' in sys.modules)"], cwd=REPO,
        capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-2:] == ["False", "False"], done.stderr
    assert "usage: a2ats" in done.stdout


BAD_ARGUMENTS = {
    "dtype": (["generate", "MODEL", "--prompt", "x", "--dtype", "foo"], "argument --dtype: invalid choice: 'foo'"),
    "topk fraction": (["generate", "MODEL", "--prompt", "x", "--topk", "1.5"], "argument --topk"),
    "topk negative": (["eval", "MODEL", "--haystack", "TEXT", "--topk", "0.1", "-3"], "argument --topk"),
    "no prompt file": (["generate", "MODEL", "--prompt-file", "/no/such.txt"], "no such file: '/no/such.txt'"),
    "no model dir": (["generate", "/no/such/model", "--prompt", "x"], "no such directory: '/no/such/model'"),
    "no text": (["calibrate", "MODEL", "--text", "/no/such.txt", "--out", "o"], "no such file"),
    "n-centroids": (["calibrate", "MODEL", "--text", "TEXT", "--out", "o", "--n-centroids", "1"], "at least 2"),
    "max-tokens": (["calibrate", "MODEL", "--text", "TEXT", "--out", "o", "--max-tokens", "0"], "at least 1"),
    "not an int": (["generate", "MODEL", "--prompt", "x", "--max-new-tokens", "ten"], "expected an integer"),
    "buckets": (["generate", "MODEL", "--prompt", "x", "--scoring", "distance", "--buckets-per-octave", "0"],
                "at least 1"),
    "depths": (["eval", "MODEL", "--haystack", "TEXT", "--depths", "1.5"], "must lie in [0, 1]"),
    "task": (["eval", "MODEL", "--haystack", "TEXT", "--tasks", "niah"], "invalid choice: 'niah'"),
    "eval out dir": (["eval", "MODEL", "--haystack", "TEXT", "--out", "/no/such/dir/out.json"], "does not exist"),
    "tail": (["eval", "MODEL", "--haystack", "TEXT", "--perplexity", "TEXT", "--lengths", "600", "--tail", "600"],
             "--tail 600 must be shorter"),
    "device": (["generate", "MODEL", "--prompt", "x", "--device", "gpu"], "--device 'gpu'"),
    "gpu share": (["generate", "MODEL", "--prompt", "x", "--gpu-share", "1.5"], "must lie in [0, 1], got 1.5"),
    "gpu share on the gpu": (["generate", "MODEL", "--prompt", "x", "--gpu-share", "0.3", "--offload", "none"],
                             "--gpu-share splits the rows of offloaded layers"),
    "row cache": (["generate", "MODEL", "--prompt", "x", "--row-cache", "1.5"], "0 (none) or at least 2"),
    "row cache on the gpu": (["generate", "MODEL", "--prompt", "x", "--row-cache", "2", "--offload", "none"],
                             "--row-cache keeps rows of offloaded layers"),
    "row cache and share": (["generate", "MODEL", "--prompt", "x", "--row-cache", "2", "--gpu-share", "0.3"],
                            "--gpu-share 0 (the CPU attends the misses) or 1"),
    "graphs on a cpu": (["generate", "MODEL", "--prompt", "x", "--cuda-graphs", "--offload", "none", "--device", "cpu"],
                        "needs a CUDA --device"),
    "offload": (["generate", "MODEL", "--prompt", "x", "--offload", "disk"], "invalid choice: 'disk'"),
    "compile on a cpu": (["generate", "MODEL", "--prompt", "x", "--compile-layers", "--offload", "none", "--device",
                          "cpu"], "--compile-layers needs a CUDA --device"),
    "rerank offloaded": (["generate", "MODEL", "--prompt", "x", "--rerank", "2"], "--rerank needs the K/V on the GPU"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_one_line_usage_errors(case, model_dir, tmp_path, capsys):
    """Each bad argument is refused before any work, as argparse refuses: usage, then one `error:` line, exit 2."""
    text = tmp_path / "text.txt"
    text.write_text("Some prose.")
    argv, expected = BAD_ARGUMENTS[case]
    argv = [{"MODEL": str(model_dir), "TEXT": str(text)}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert exit.value.code == 2 and last.startswith("a2ats") and "error: " in last and expected in last, err


def test_dtype_choices(model_dir):
    parser = build_parser()
    for dtype in ("float32", "bfloat16", "float16", "auto"):
        assert parser.parse_args(["generate", str(model_dir), "--prompt", "x", "--dtype", dtype]).dtype == dtype
    assert parser.parse_args(["generate", str(model_dir), "--prompt", "x"]).dtype is None  # per device, at run time


def test_topk_parsing_agrees_with_the_cache():
    """The CLI accepts exactly the topk values A2ATSCache does (it checks them without importing the library)."""
    import argparse

    from a2ats_hf.config import check_topk

    for value in ["0.03", "1", "512", "1.0", "1e-2", "0", "0.0", "-3", "1.5", "2e3", "abc", "nan", "inf", ""]:
        try:
            parsed = cli._topk(value)
        except argparse.ArgumentTypeError:
            parsed = None
        try:
            check_topk(float(value) if any(c in value for c in ".eE") else int(value))
            accepted = True
        except (TypeError, ValueError):
            accepted = False
        assert (parsed is not None) == accepted, value


def test_choices_match_the_library():
    from a2ats_eval.tasks import TASKS
    from a2ats_hf.cache import RERANK
    from a2ats_hf.scoring import SCORERS

    assert list(cli.TASKS) == list(TASKS) and sorted(cli.SCORERS) == sorted(SCORERS) and cli.RERANK == RERANK


def test_library_errors_are_one_line(model_dir, tmp_path, monkeypatch):
    """An error the library raises for what the user gave (here: a codebooks directory without codebooks) prints as
    one `a2ats: error:` line with exit 1 and no traceback; A2ATS_DEBUG=1 shows the traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["generate", str(model_dir), "--codebooks", str(empty), "--prompt", "hi", "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "a2ats_hf.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "A2ATS_DEBUG": ""})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("a2ats: error: ") and str(empty) in lines[-1], done.stderr
    monkeypatch.setenv("A2ATS_DEBUG", "1")
    with pytest.raises(OSError):
        main(argv)
