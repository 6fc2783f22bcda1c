"""Codebooks next to the model: local model folders, the huggingface_hub cache offline, the upload commit, and
integrity failures. The Hub is unreachable from the tests, so uploads are checked at HfApi's commit boundary."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import EntryNotFoundError
from test_codebooks import books_for, config

from a2ats_hf import A2ATSCache, Codebooks, hub_utils
from a2ats_hf.codebooks import CONFIG_NAME, WEIGHTS_NAME

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def books() -> Codebooks:
    return books_for(config())


def populate_hub_cache(cache_dir, repo_id: str, source) -> None:
    """Lay files out the way huggingface_hub's downloads do: blobs by hash, snapshot symlinks, refs/main."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT / "a2ats"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        data = (source / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


def test_model_folder_with_a2ats_subfolder(tmp_path, books):
    """A model folder with a2ats/ inside resolves like the codebooks folder itself; A2ATSCache.from_pretrained works."""
    books.save_pretrained(tmp_path / "a2ats")
    loaded = Codebooks.from_pretrained(tmp_path)
    assert torch.equal(loaded.whitened_centroids, books.whitened_centroids)
    cache = A2ATSCache.from_pretrained(str(tmp_path), topk=0.05, budget="kv_head")
    assert cache.topk == 0.05 and cache.budget == "kv_head" and cache.codebooks.n_centroids == 37


def test_cache_from_the_model_itself(tmp_path, tiny):
    """A2ATSCache.from_pretrained(model): the codebooks from where the model was loaded; a CUDA model decodes in
    graphs unless cuda_graphs=False, a CPU model keeps its own forward; a model that does not say where it came
    from is refused."""
    from a2ats_hf.graphs import GraphRunner, release_decoding

    model, books = tiny
    books.save_pretrained(tmp_path / "a2ats")
    forward = model.forward
    model.config._name_or_path = str(tmp_path)
    try:
        assert A2ATSCache.from_pretrained(model, cuda_graphs=False).codebooks.n_centroids == books.n_centroids
        assert model.forward == forward
        cache = A2ATSCache.from_pretrained(model, topk=0.05, offload="none")
        assert isinstance(model.forward, GraphRunner) == (model.device.type == "cuda") and cache.topk == 0.05
        model.config._name_or_path = ""
        with pytest.raises(ValueError, match="Codebooks.from_pretrained"):
            A2ATSCache.from_pretrained(model)
    finally:
        model.config._name_or_path = ""
        release_decoding(model)


@pytest.mark.parametrize("offline", ["local_files_only", "HF_HUB_OFFLINE"])
def test_resolves_from_the_hub_cache_offline(tmp_path, books, monkeypatch, offline):
    """A repository already in huggingface_hub's cache loads with the Hub unreachable."""
    books.save_pretrained(tmp_path / "src")
    populate_hub_cache(tmp_path / "hub", "org/model", tmp_path / "src")
    kwargs = {"cache_dir": tmp_path / "hub"}
    if offline == "local_files_only":
        kwargs["local_files_only"] = True
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = Codebooks.from_pretrained("org/model", **kwargs)
    assert torch.equal(loaded.whitener, books.whitener)


def test_not_cached_while_offline(tmp_path, monkeypatch):
    """Offline without a cached copy: a FileNotFoundError that says why."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="offline"):
        Codebooks.from_pretrained("org/other", cache_dir=tmp_path)


def test_repo_without_codebooks_shows_the_command(monkeypatch):
    """A model repository with no a2ats/ folder: the error shows how to build and push codebooks."""
    def missing(*args, **kwargs):
        raise EntryNotFoundError("404")

    monkeypatch.setattr(hub_utils, "hf_hub_download", missing)
    with pytest.raises(FileNotFoundError, match="a2ats calibrate org/model .* --push-to-hub org/model"):
        A2ATSCache.from_pretrained("org/model")


def test_push_builds_one_commit_with_the_expected_files(books, monkeypatch, tmp_path):
    """push_to_hub makes the repo if needed and uploads config, tensors and README under a2ats/ in one commit."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        calls["commit"] = (repo_id, [(op.path_in_repo, op.path_or_fileobj) for op in operations], kwargs)
        calls["contents"] = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    assert books.push_to_hub("org/model", revision="dev", private=True, create_pr=True) == "commit-info"
    assert calls["repo"] == ("org/model", {"private": True, "exist_ok": True})
    repo_id, operations, kwargs = calls["commit"]
    assert repo_id == "org/model"
    assert sorted(p for p, _ in operations) == sorted(["a2ats/README.md", f"a2ats/{CONFIG_NAME}",
                                                       f"a2ats/{WEIGHTS_NAME}"])
    assert kwargs == {"commit_message": "Add A2ATS codebooks (37 centroids)", "revision": "dev", "create_pr": True}
    books.save_pretrained(tmp_path)
    assert calls["contents"][f"a2ats/{WEIGHTS_NAME}"] == (tmp_path / WEIGHTS_NAME).read_bytes()
    assert json.loads(calls["contents"][f"a2ats/{CONFIG_NAME}"]) == json.loads((tmp_path / CONFIG_NAME).read_text())
    assert b"37 per (layer, KV head)" in calls["contents"]["a2ats/README.md"]


def test_a_pickle_is_refused(tmp_path, books):
    """A pickle in place of the safetensors file (checksum updated to match) is refused, never unpickled."""
    books.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    torch.save({"whitener": books.whitener}, weights)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="safetensors"):
        Codebooks.from_pretrained(tmp_path)


def test_unknown_source():
    """A path that is neither a folder nor a valid repository id fails clearly."""
    with pytest.raises(FileNotFoundError, match="'/no/such/dir/here': /no/such/dir/here does not exist"):
        Codebooks.from_pretrained("/no/such/dir/here")


@pytest.fixture
def no_hub(monkeypatch):
    """huggingface_hub's download fails the test if asked."""
    def asked(*args, **kwargs):
        raise AssertionError(f"the Hub was asked: {args}")

    monkeypatch.setattr(hub_utils, "hf_hub_download", asked)


@pytest.mark.parametrize("source, shown", [
    ("./missing", "missing does not exist"), ("../missing-a2ats", "missing-a2ats does not exist"),
    ("/abs/missing", "/abs/missing does not exist"), ("~/missing-a2ats", "missing-a2ats does not exist"),
    ("books/of/model", "books/of/model does not exist"), ("here/missing", "nearest existing folder: .*here"),
    ("a-file", "a-file is a file"), ("not a repo", "not a repo does not exist"),
])
def test_missing_local_paths_fail_at_once(tmp_path, monkeypatch, no_hub, source, shown):
    """A string that looks like a local path (./, ../, /, ~, more than one slash, a first part that is a local
    folder, an existing file, no valid repository id) fails at once naming the path, without asking the Hub."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileNotFoundError, match=f"No A2ATS codebooks at '{source}': .*{shown}.*not looked up"):
        Codebooks.from_pretrained(source)
    with pytest.raises(FileNotFoundError, match="does not exist|is a file"):
        Codebooks.from_pretrained(tmp_path / source.lstrip("./~"))  # a Path is always local


def test_a_repository_id_still_goes_to_the_hub(monkeypatch, tmp_path):
    """owner/name (and a bare name) are Hub repository ids when nothing local by that name exists."""
    monkeypatch.chdir(tmp_path)
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append(repo_id)
        raise EntryNotFoundError("404")

    monkeypatch.setattr(hub_utils, "hf_hub_download", download)
    for repo_id in ("org/model", "model"):
        with pytest.raises(FileNotFoundError, match="has no A2ATS codebooks"):
            Codebooks.from_pretrained(repo_id)
    assert asked == ["org/model", "model"]
