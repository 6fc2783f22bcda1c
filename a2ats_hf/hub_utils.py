"""Codebooks on the Hugging Face Hub: pushed into a repository's ``a2ats/`` folder in one commit, resolved and
cached by huggingface_hub exactly like model weights (revisions, tokens, ``HF_HOME``, ``HF_HUB_OFFLINE``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

if TYPE_CHECKING:
    from .codebooks import Codebooks

SUBFOLDER = "a2ats"
CONFIG_NAME = "a2ats_config.json"  # the two files of a codebooks folder
WEIGHTS_NAME = "a2ats_codebooks.safetensors"


def _calibrate_hint(repo_id: str) -> str:
    return f"  a2ats calibrate {repo_id} --text YOUR_TEXTS.txt --push-to-hub {repo_id}"


def local_path_reason(source: str | os.PathLike) -> str | None:
    """Why ``source`` must be a local path rather than a Hub repository id ("owner/name" or "name"), or None when it
    may be a repository id: a path object; a string starting with ./, ../, /, ~ (or absolute); one with more
    separators than owner/name; one naming an existing file; one whose first part is a local folder; one that is
    no valid repository id."""
    if isinstance(source, os.PathLike):
        return "it is a path object"
    text = str(source)
    if text.startswith(("./", "../", "~", f".{os.sep}", f"..{os.sep}")) or text in (".", "..") or os.path.isabs(text):
        return "it starts like a local path"
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    if sum(text.count(sep) for sep in separators) > 1 or (os.sep != "/" and os.sep in text):
        return "it has more separators than a Hub id (owner/name)"
    if os.path.lexists(text):
        return "it exists locally"
    first = text.split("/")[0]
    if first != text and os.path.isdir(first):
        return f"its first part, {first}, is a local folder"
    try:
        validate_repo_id(text)
    except HFValidationError:
        return "it is not a valid Hub repository id"
    return None


def _missing_path(source: str | os.PathLike, reason: str) -> FileNotFoundError:
    """FileNotFoundError naming the path, the part of it that exists, and why the Hub was not asked."""
    path = Path(source).expanduser().absolute()
    existing = next((p for p in path.parents if p.is_dir()), None)
    if path.exists():
        what = f"{path} is a file, not a folder of codebooks (give the folder holding {CONFIG_NAME})"
    else:
        nearest = f" (nearest existing folder: {existing})" if existing and existing != Path(path.anchor) else ""
        what = f"{path} does not exist{nearest}"
    return FileNotFoundError(f"No A2ATS codebooks at {str(source)!r}: {what}. It was not looked up on the Hugging "
                             f"Face Hub: {reason}.")


def resolve(
    repo_id_or_path: str | Path,
    subfolder: str = SUBFOLDER,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local directory holding ``a2ats_config.json`` and the tensors, from a path or a Hub repository.

    A local path may be the codebooks folder itself or a model folder with a ``subfolder`` inside; a missing one
    that looks like a path (:func:`local_path_reason`) fails at once with FileNotFoundError, without asking the
    Hub. A repository is resolved through huggingface_hub's cache; nothing is executed from it.
    """
    path = Path(repo_id_or_path).expanduser()
    if path.is_dir():
        return path / subfolder if (path / subfolder / CONFIG_NAME).is_file() else path
    reason = local_path_reason(repo_id_or_path)
    if reason is not None:
        raise _missing_path(repo_id_or_path, reason)
    repo_id = str(repo_id_or_path)
    files = {}
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            files[name] = hf_hub_download(repo_id, name, subfolder=subfolder or None, revision=revision,
                                          cache_dir=cache_dir, local_files_only=bool(local_files_only), token=token)
    except EntryNotFoundError as error:
        if isinstance(error, LocalEntryNotFoundError):
            raise FileNotFoundError(
                f"A2ATS codebooks of {repo_id!r} (no local folder of that name either) are not in the local Hub "
                "cache, and the Hub was not asked (offline: HF_HUB_OFFLINE=1 or local_files_only=True) or could not "
                f"be reached: {error}"
            ) from None
        raise FileNotFoundError(
            f"{repo_id!r} has no A2ATS codebooks in {subfolder}/ (revision {revision or 'main'}). Build and upload "
            f"them with:\n{_calibrate_hint(repo_id)}"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"The Hub repository {repo_id!r} has no revision {revision!r}.") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local directory nor a Hub repository you can read (a private or gated one "
            "needs a token: token=... or `hf auth login`)."
        ) from None
    return Path(files[CONFIG_NAME]).parent


def model_card(books: "Codebooks") -> str:
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
        f"- calibration data: {', '.join(c.get('data', [])) or 'not recorded'}; "
        f"{c.get('text_tokens', '?')} text tokens + {c.get('uuid_tokens', '?')} random-UUID tokens",
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
    books: "Codebooks",
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
