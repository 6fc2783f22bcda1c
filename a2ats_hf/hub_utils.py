"""Codebooks on the Hugging Face Hub: pushed into a repository's ``a2ats/`` folder in one commit, resolved and
cached by huggingface_hub exactly like model weights (revisions, tokens, ``HF_HOME``, ``HF_HUB_OFFLINE``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from .codebooks import CONFIG_NAME, WEIGHTS_NAME, Codebooks

SUBFOLDER = "a2ats"


def _calibrate_hint(repo_id: str) -> str:
    return f"  a2ats calibrate {repo_id} --text YOUR_TEXTS.txt --push-to-hub {repo_id}"


def resolve(
    repo_id_or_path: str | Path,
    subfolder: str = SUBFOLDER,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local directory holding ``a2ats_config.json`` and the tensors, from a path or a Hub repository.

    A local path may be the codebooks folder itself or a model folder with a ``subfolder`` inside. A repository
    is resolved through huggingface_hub's cache; nothing is executed from it.
    """
    path = Path(repo_id_or_path)
    if path.is_dir():
        return path / subfolder if (path / subfolder / CONFIG_NAME).is_file() else path
    repo_id = str(repo_id_or_path)
    files = {}
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            files[name] = hf_hub_download(repo_id, name, subfolder=subfolder or None, revision=revision,
                                          cache_dir=cache_dir, local_files_only=bool(local_files_only), token=token)
    except EntryNotFoundError as error:
        if isinstance(error, LocalEntryNotFoundError):
            raise FileNotFoundError(
                f"A2ATS codebooks of {repo_id!r} are not in the local cache and the Hub cannot be asked "
                f"(offline, HF_HUB_OFFLINE=1 or local_files_only=True): {error}"
            ) from None
        raise FileNotFoundError(
            f"{repo_id!r} has no A2ATS codebooks in {subfolder}/ (revision {revision or 'main'}). Build and upload "
            f"them with:\n{_calibrate_hint(repo_id)}"
        ) from None
    except (RepositoryNotFoundError, HFValidationError):
        raise FileNotFoundError(f"{repo_id!r} is neither a local directory nor a Hub repository you can read.") from None
    return Path(files[CONFIG_NAME]).parent


def model_card(books: Codebooks) -> str:
    """The README placed beside the codebooks: how they were built."""
    c, fp = books.calibration, books.fingerprint
    lines = [
        "# A2ATS codebooks",
        "",
        "Query-aware vector-quantization codebooks for [a2ats-hf](https://pypi.org/project/a2ats-hf/).",
        "",
        f"- model: {c.get('model') or fp['model_type']} (revision {c.get('model_revision') or 'unknown'})",
        f"- shape: {fp['num_hidden_layers']} layers x {fp['num_key_value_heads']} KV heads, head dim {fp['head_dim']}",
        f"- centroids: {books.n_centroids} per (layer, KV head); window {books.window}, offset {books.offset}, "
        f"sinks {books.sink}",
        f"- calibration data: {', '.join(c.get('data', [])) or 'not recorded'}; {c.get('text_tokens', '?')} text tokens "
        f"+ {c.get('uuid_tokens', '?')} random-UUID tokens",
        f"- k-means: {c.get('kmeans_iterations', '?')} iterations, objective {c.get('kmeans_objective', '?')}",
        f"- built: {c.get('date', '?')}",
        "",
        "```python",
        "from a2ats_hf import A2ATSCache",
        "cache = A2ATSCache.from_pretrained(MODEL_ID, topk=0.03)",
        "```",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    books: Codebooks,
    repo_id: str,
    subfolder: str = SUBFOLDER,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
):
    """Upload the tensors, config and a README into ``repo_id/subfolder`` in a single commit."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    prefix = f"{subfolder}/" if subfolder else ""
    with tempfile.TemporaryDirectory() as tmp:
        books.save_pretrained(tmp)
        (Path(tmp) / "README.md").write_text(model_card(books))
        operations = [
            CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=str(Path(tmp) / name))
            for name in (CONFIG_NAME, WEIGHTS_NAME, "README.md")
        ]
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Add A2ATS codebooks ({books.n_centroids} centroids)",
            revision=revision,
            create_pr=create_pr,
        )
