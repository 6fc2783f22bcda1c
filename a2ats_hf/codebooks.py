"""`Codebooks`: the per-(layer, KV head) query-aware codebooks of one model, with safetensors + JSON I/O."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .families import family_of

FORMAT_VERSION = 1
CONFIG_NAME = "a2ats_config.json"
WEIGHTS_NAME = "a2ats_codebooks.safetensors"
KEYS = ("pre_rope", "post_rope")


def _rope_parameters(config: Any) -> dict:
    rope = getattr(config, "rope_parameters", None) or {
        "rope_theta": getattr(config, "rope_theta", None),
        **(getattr(config, "rope_scaling", None) or {}),
    }
    return json.loads(json.dumps(rope, sort_keys=True, default=str))


def fingerprint(config: Any) -> dict:
    """What a codebook depends on in a model config: architecture, shapes, RoPE settings, and which layers A2ATS
    serves (the others, sliding-window layers, keep an exact cache of ``sliding_window`` tokens)."""
    family = family_of(config)
    heads = config.num_attention_heads
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "rope_parameters": _rope_parameters(config),
        "a2ats_layers": family.retrieval_layers(config),
        "sliding_window": family.sliding_window(config),
    }


def weights_signature(attention: Any) -> float | None:
    """Frobenius norm of an attention layer's key projection weight: tells a revision or fine-tune of the same
    architecture apart, and survives dtype changes (None for packed, quantized weights)."""
    weight = family_of(attention.config).key_weight(attention)
    if weight is None or not weight.is_floating_point() or weight.is_meta:
        return None
    return float(weight.detach().double().norm())


def check_supported(config: Any) -> None:
    """NotImplementedError (or ValueError) naming what is unsupported about ``config``."""
    family_of(config)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Codebooks:
    """Codebooks of every (layer, KV head) of one model.

    ``whitener`` is the Cholesky factor L of the normalised query second moment ([layers, kv_heads, D, D]);
    ``whitened_centroids`` are the k-means centroids c' in the whitened space z = k L ([layers, kv_heads, M, D]).
    ``centroids`` = c' L^-1 are the same centroids in key space, used to score queries (derived, not stored).
    ``keys`` says what was quantized: "pre_rope" (A2ATS: keys with RoPE undone, scored by windowed-RoPE queries) or
    "post_rope" (the keys as the model rotates them, scored by the true query; an ablation for evaluation).
    """

    whitener: torch.Tensor
    whitened_centroids: torch.Tensor
    fingerprint: dict
    window: int = 64
    offset: int = 2048
    sink: int = 8
    calibration: dict = field(default_factory=dict)
    keys: str = "pre_rope"
    centroids: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.keys not in KEYS:
            raise ValueError(f"keys must be one of {KEYS}, got {self.keys!r}")
        self.whitener = self.whitener.float().contiguous()
        self.whitened_centroids = self.whitened_centroids.float().contiguous()
        self.centroids = torch.linalg.solve_triangular(
            self.whitener.transpose(-1, -2), self.whitened_centroids.transpose(-1, -2), upper=True
        ).transpose(-1, -2).contiguous()

    @property
    def n_centroids(self) -> int:
        return self.whitened_centroids.shape[-2]

    @property
    def num_layers(self) -> int:
        """Layers with a codebook: those A2ATS serves."""
        return self.whitener.shape[0]

    @property
    def layers(self) -> list[int]:
        """Model layer index of each codebook (every layer, in codebooks that predate sliding-window support)."""
        return self.fingerprint.get("a2ats_layers") or list(range(self.num_layers))

    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "n_centroids": self.n_centroids,
            "window": self.window,
            "offset": self.offset,
            "sink": self.sink,
            "keys": self.keys,
            "fingerprint": self.fingerprint,
            "calibration": self.calibration,
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``a2ats_codebooks.safetensors`` and ``a2ats_config.json`` (with the tensors' sha256) to a directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / WEIGHTS_NAME
        save_file({"whitener": self.whitener, "whitened_centroids": self.whitened_centroids}, str(weights))
        config = {**self.config_dict(), "sha256": _sha256(weights)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | Path,
        subfolder: str = "a2ats",
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
    ) -> "Codebooks":
        """Load codebooks from a local directory or a Hub repository's ``subfolder`` (safetensors only, no pickle).

        Hub files are resolved and cached by huggingface_hub, honouring revisions, tokens, ``HF_HOME`` and
        ``HF_HUB_OFFLINE``; the tensors are checked against the checksum in the config.
        """
        from .hub_utils import resolve

        directory = resolve(repo_id_or_path, subfolder, revision, cache_dir, local_files_only, token)
        config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights):
            if not path.is_file():
                raise FileNotFoundError(f"No A2ATS codebooks in {directory}: {path.name} is missing.")
        config = json.loads(config_path.read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version={config.get('format_version')}, this a2ats_hf reads {FORMAT_VERSION}."
            )
        if "sha256" in config and _sha256(weights) != config["sha256"]:
            raise ValueError(f"{weights} does not match the checksum in {config_path.name}: truncated or altered.")
        try:
            tensors = load_file(str(weights))
        except Exception as error:  # safetensors refuses anything else, pickles included
            raise ValueError(f"{weights} is not a valid safetensors file: {error}") from None
        return cls(
            whitener=tensors["whitener"],
            whitened_centroids=tensors["whitened_centroids"],
            fingerprint=config["fingerprint"],
            window=config["window"],
            offset=config["offset"],
            sink=config["sink"],
            calibration=config.get("calibration", {}),
            keys=config.get("keys", "pre_rope"),
        )

    def push_to_hub(
        self,
        repo_id: str,
        subfolder: str = "a2ats",
        revision: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ):
        """Upload these codebooks (tensors, config, a README) into ``repo_id/subfolder`` in one commit."""
        from .hub_utils import push_to_hub

        return push_to_hub(self, repo_id, subfolder, revision, private, token, commit_message, create_pr)

    def validate(self, model_config: Any, attention: Any = None) -> None:
        """Raise ``ValueError`` naming every field where these codebooks do not match ``model_config``.

        Given the attention module of the first layer A2ATS serves, also compare its weights with those calibrated
        on.
        """
        expected = fingerprint(model_config)
        recorded_fp = {"a2ats_layers": self.layers, "sliding_window": None, **self.fingerprint}
        mismatches = [
            f"{key}: codebooks have {recorded_fp.get(key)!r}, model has {value!r}"
            for key, value in expected.items()
            if recorded_fp.get(key) != value
        ]
        recorded, actual = self.fingerprint.get("weights_signature"), attention and weights_signature(attention)
        if recorded and actual and abs(recorded - actual) > 1e-3 * recorded:
            mismatches.append(
                f"weights_signature (key projection norm): codebooks have {recorded:.6g}, model has {actual:.6g} "
                "(another revision or fine-tune)"
            )
        layers, kv_heads, dim = self.whitener.shape[:3]
        shape = (len(expected["a2ats_layers"]), expected["num_key_value_heads"], expected["head_dim"])
        if (layers, kv_heads, dim) != shape:
            mismatches.append(f"tensor shape (layers, kv_heads, head_dim): codebooks have {(layers, kv_heads, dim)}, model has {shape}")
        if mismatches:
            raise ValueError("These A2ATS codebooks were built for another model:\n  " + "\n  ".join(mismatches))
