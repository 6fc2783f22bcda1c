"""The `a2ats` command line: calibrate then generate, on a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from a2ats_hf import Codebooks
from a2ats_hf.cli import main

from conftest import tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from assets import smollm2_path

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
    main(["generate", str(model_dir), "--codebooks", str(out), "--prompt-file", str(prompt), "--topk", "0.1",
          "--max-new-tokens", "4", "--device", "cpu", "--scoring", queries, *buckets])
    err = capsys.readouterr().err
    assert "attended" in err and "MiB" in err


def test_generate_refuses_buckets_without_distance_scoring(model_dir):
    with pytest.raises(SystemExit, match="--scoring distance"):
        main(["generate", str(model_dir), "--prompt", "hi", "--buckets-per-octave", "4", "--device", "cpu"])


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


def test_generate_rejects_bad_topk(model_dir):
    """A topk of 0 is refused with a clear message."""
    with pytest.raises(SystemExit):
        main(["generate", str(model_dir), "--codebooks", "missing", "--prompt", "hi", "--topk", "0"])


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
