"""`Codebooks`: the per-(layer, KV head) query-aware codebooks of one model, with safetensors + JSON I/O."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .families import attention_modules, family_of
from .hub_utils import CONFIG_NAME, WEIGHTS_NAME, push_to_hub, resolve

# 2: the weights signature covers every served layer (bilinear probes of its key projection); 1 had one norm.
FORMAT_VERSION = 2
KEYS = ("pre_rope", "post_rope")
TENSORS = ("whitener", "whitened_centroids")
REQUIRED = ("format_version", "n_centroids", "window", "offset", "sink", "keys", "fingerprint", "sha256",
            "weights_signature")
FINGERPRINT_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "rope_parameters", "a2ats_layers", "sliding_window")

# The weights signature: SIGNATURE_PROBES bilinear probes r1^T W r2 of each served layer's key projection weight W,
# rounded to bfloat16 (one canonical value whether the checkpoint is loaded in float32, bfloat16 or float16), with
# Rademacher vectors drawn from Python's seeded `random` (the same on every machine and torch version), beside
# ||W||_F; two signatures agree when every value differs by at most SIGNATURE_TOLERANCE * ||W||_F. See
# layer_signature and _layer_deviation for float32 weights (on the bfloat16 grid or not).
SIGNATURE_SCHEME = "kproj-bf16-rademacher8-v1"
SIGNATURE_PROBES = 8
SIGNATURE_TOLERANCE = 1e-4


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


_probe_cache: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _probes(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed ±1 probe vectors ([P, rows], [P, cols], float32) for a weight of this shape, cached per device."""
    key = (rows, cols, str(device))
    if key not in _probe_cache:
        n = SIGNATURE_PROBES * (rows + cols)
        bits = random.Random(f"a2ats weights signature {rows}x{cols}").getrandbits(n).to_bytes((n + 7) // 8, "little")
        octets = torch.frombuffer(bytearray(bits), dtype=torch.uint8)
        signs = ((octets[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[:n].float() * 2 - 1
        left, right = signs.split([SIGNATURE_PROBES * rows, SIGNATURE_PROBES * cols])
        _probe_cache[key] = (left.view(SIGNATURE_PROBES, rows).to(device),
                             right.view(SIGNATURE_PROBES, cols).to(device))
    return _probe_cache[key]


PLAIN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _key_weight(attention: Any) -> torch.Tensor | None:
    """The key projection weight of ``attention`` (gathered whole if sharded), or None where it does not hold the
    weight's values as a plain float16/bfloat16/float32 tensor: packed or quantized (float8 with its scales
    elsewhere included), or offloaded to the meta device."""
    weight = family_of(attention.config).key_weight(attention)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in PLAIN_DTYPES or weight.is_meta:
        return None
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight  # a DTensor of tensor parallelism


WIDE_DTYPES = (torch.float32, torch.float64)


def _signature_of(weight: torch.Tensor, rounded: bool = True) -> dict:
    """{"norm", "probes"} of a weight as rounded to bfloat16, in float32: the bfloat16 values, the ±1 probes and
    their products are exact in float32 (and as TF32 or bfloat16 matmul inputs), so only the summation order
    differs between devices: under 1e-6 of ||W||_F. ``rounded=False``: of the weight as it is, in float64."""
    w = weight.detach()
    w = w.reshape(w.shape[0], -1)
    w = w.to(torch.bfloat16).float() if rounded else w.double()
    left, right = (p.to(w.dtype) for p in _probes(*w.shape, w.device))
    probes = ((left @ w).double() * right.double()).sum(-1)
    # by rows, then in float64: one float32 sum of millions of squares drifts by ~3e-5 on the CPU
    norm = torch.linalg.vector_norm(w, dim=-1).double().square().sum().sqrt()
    values = torch.cat([norm[None], probes]).tolist()  # one device sync
    return {"norm": values[0], "probes": values[1:]}


def layer_signature(attention: Any) -> dict | None:
    """The weights signature of one attention layer, from its key projection weight W (the family's
    ``key_weight``) rounded to bfloat16: {"norm": ||W||_F, "probes": [r_i^T W s_i]}, the same whether a checkpoint
    is loaded in float32, bfloat16 or float16. A float32 W also records either that its values lie on the bfloat16
    grid ("grid": a bfloat16 checkpoint, so float32 weights off that grid are another model's) or the signature of
    W rounded through float16 ("fp16": a float32 checkpoint, which a float16 load rounds differently). None for a
    weight that is not a plain floating-point tensor (see :func:`_key_weight`)."""
    weight = _key_weight(attention)
    if weight is None:
        return None
    signature = _signature_of(weight)
    if weight.dtype in WIDE_DTYPES:
        if torch.equal(weight, weight.to(torch.bfloat16).to(weight.dtype)):
            signature["grid"] = "bfloat16"
        else:
            fp16 = _signature_of(weight.detach().half())
            if all(map(math.isfinite, [fp16["norm"], *fp16["probes"]])):  # not past float16's range
                signature["fp16"] = fp16
    return signature


def _deviation(recorded: dict, actual: dict) -> float:
    """The largest difference between two signatures' values relative to the recorded norm (inf if not finite)."""
    pairs = zip([recorded["norm"], *recorded["probes"]], [actual["norm"], *actual["probes"]])
    deviation = max(abs(a - b) for a, b in pairs) / max(abs(recorded["norm"]), 1e-30)
    return deviation if math.isfinite(deviation) else math.inf


def _layer_deviation(recorded: dict, weight: torch.Tensor) -> float:
    """How far ``weight`` is from a recorded layer signature, relative to its norm. A float32 weight of a layer
    recorded on the bfloat16 grid must lie on it too (else it is not that checkpoint, and is compared as it is);
    any other weight is rounded to bfloat16 and compared with either rounding path of a float32 checkpoint
    (bfloat16, or float16 then bfloat16), the float16 path of a float32 weight computed only when needed."""
    wide = weight.dtype in WIDE_DTYPES
    if recorded.get("grid") == "bfloat16" and wide:
        rounded = weight.detach().to(torch.bfloat16)
        on_grid = torch.equal(weight.detach(), rounded.to(weight.dtype))
        return _deviation(recorded, _signature_of(rounded) if on_grid else _signature_of(weight, rounded=False))
    actual = _signature_of(weight)
    deviation = min(_deviation(form, actual) for form in [recorded, recorded.get("fp16")] if form)
    if deviation > SIGNATURE_TOLERANCE and wide:
        deviation = min(deviation, _deviation(recorded, _signature_of(weight.detach().half())))
    return deviation


def check_supported(config: Any) -> None:
    """NotImplementedError (or ValueError) naming what is unsupported about ``config``."""
    family_of(config)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int: TypeError unless it is an integer (bool excluded), ValueError outside the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"in [{minimum}, {maximum}]" if maximum is not None and minimum is not None
                  else f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entry_ok(entry: Any, nested: bool = True) -> bool:
    """A layer's signature: {"norm", "probes"} of finite numbers and, at the top, either "grid": "bfloat16" or an
    "fp16" signature of the same form."""
    if not (isinstance(entry, dict) and _is_number(entry.get("norm")) and isinstance(entry.get("probes"), list)
            and len(entry["probes"]) == SIGNATURE_PROBES and all(map(_is_number, entry["probes"]))):
        return False
    extra = set(entry) - {"norm", "probes"}
    if not nested or not extra:
        return not extra
    if extra == {"grid"}:
        return entry["grid"] == "bfloat16"
    return extra == {"fp16"} and _entry_ok(entry["fp16"], nested=False)


def check_signature(signature: Any, layers: list[int]) -> None:
    """ValueError unless ``signature`` is a weights signature of this scheme with one entry per served layer
    (None for a layer whose key weight was not floating point)."""
    if not isinstance(signature, dict):
        raise ValueError(f"weights_signature must be a mapping, got {type(signature).__name__}")
    if signature.get("scheme") != SIGNATURE_SCHEME:
        raise ValueError(f"weights_signature has scheme {signature.get('scheme')!r}; this a2ats_hf computes "
                         f"{SIGNATURE_SCHEME!r}")
    entries = signature.get("layers")
    if not isinstance(entries, list) or len(entries) != len(layers):
        count = len(entries) if isinstance(entries, list) else repr(entries)
        raise ValueError(f"weights_signature has {count} layer entries for the {len(layers)} layers A2ATS serves")
    for layer, entry in zip(layers, entries):
        if entry is not None and not _entry_ok(entry):
            raise ValueError(f"weights_signature of layer {layer} is malformed (wants a finite norm, "
                             f"{SIGNATURE_PROBES} finite probes, and grid or fp16): {str(entry)[:200]}")


@dataclass
class Codebooks:
    """Codebooks of every (layer, KV head) of one model.

    ``whitener`` is the Cholesky factor L of the normalised query second moment ([layers, kv_heads, D, D]);
    ``whitened_centroids`` are the k-means centroids c' in the whitened space z = k L ([layers, kv_heads, M, D]).
    ``centroids`` = c' L^-1 are the same centroids in key space, used to score queries (derived, not stored).
    ``keys`` says what was quantized: "pre_rope" (A2ATS: keys with RoPE undone, scored by windowed-RoPE queries) or
    "post_rope" (the keys as the model rotates them, scored by the true query; an ablation for evaluation).
    ``weights_signature`` identifies the weights calibrated on ({"scheme", "layers": one :func:`layer_signature`
    per served layer}); :meth:`validate` compares it with a model's. Codebooks built without a model (None) cannot
    be compared, nor saved until :meth:`sign` records it.
    """

    whitener: torch.Tensor
    whitened_centroids: torch.Tensor
    fingerprint: dict
    window: int = 64
    offset: int = 2048
    sink: int = 8
    calibration: dict = field(default_factory=dict)
    keys: str = "pre_rope"
    weights_signature: dict | None = None
    centroids: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Refuse settings of the wrong type or range, tensors of inconsistent shapes, non-finite values, and a
        whitener that is not a Cholesky factor (lower triangular, positive diagonal)."""
        if self.keys not in KEYS:
            raise ValueError(f"keys must be one of {KEYS}, got {self.keys!r}")
        self.window = check_int("window", self.window, 1)
        self.offset = check_int("offset", self.offset, 0)
        self.sink = check_int("sink", self.sink, 0)
        for name in ("fingerprint", "calibration"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        for name in TENSORS:
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point() or tensor.dim() != 4:
                raise ValueError(f"{name} must be a 4-D floating-point tensor, got {tensor.dtype} "
                                 f"{tuple(tensor.shape)}")
        w, c = self.whitener, self.whitened_centroids
        if w.shape[-1] != w.shape[-2] or w.shape[:2] != c.shape[:2] or c.shape[-1] != w.shape[-1]:
            raise ValueError(f"whitener {tuple(w.shape)} and whitened_centroids {tuple(c.shape)} disagree: they must "
                             "be [layers, kv_heads, D, D] and [layers, kv_heads, n_centroids, D]")
        if not 1 <= c.shape[-2] <= 65536:
            raise ValueError(f"n_centroids must lie in [1, 65536] (codes are uint16), got {c.shape[-2]}")
        self.whitener = w.float().contiguous()
        self.whitened_centroids = c.float().contiguous()
        for name in TENSORS:
            _check_finite(name, getattr(self, name))
        diagonal = self.whitener.diagonal(dim1=-2, dim2=-1)
        if not torch.equal(self.whitener, self.whitener.tril()) or not (diagonal > 0).all():
            raise ValueError("whitener must be lower triangular with a positive diagonal (a Cholesky factor)")
        self.centroids = torch.linalg.solve_triangular(
            self.whitener.transpose(-1, -2), self.whitened_centroids.transpose(-1, -2), upper=True
        ).transpose(-1, -2).contiguous()
        _check_finite("centroids (whitened_centroids through the inverse whitener)", self.centroids)
        if self.weights_signature is not None:
            check_signature(self.weights_signature, self.layers)
        self._warned_unchecked = False

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
            "weights_signature": self.weights_signature,
            "calibration": self.calibration,
        }

    def sign(self, model: Any) -> "Codebooks":
        """Record the weights signature of ``model`` (whose config these codebooks must match): what
        :func:`calibrate` does itself, for codebooks built another way. Returns ``self``."""
        self.validate(model.config)
        modules = {m.layer_idx: m for m in attention_modules(model)}
        self.weights_signature = {"scheme": SIGNATURE_SCHEME,
                                  "layers": [layer_signature(modules[idx]) for idx in self.layers]}
        return self

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``a2ats_codebooks.safetensors`` and ``a2ats_config.json`` (with the tensors' sha256) to a directory."""
        if self.weights_signature is None:
            raise ValueError("These codebooks carry no weights_signature, which loading requires: calibrate() "
                             "records it; codebooks built another way get it from books.sign(model).")
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
        ``HF_HUB_OFFLINE``; a string that looks like a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``) is never
        sent to the Hub. The config must carry every field (``sha256`` and ``weights_signature`` included), agree
        with the tensors' shapes, and the tensors must match the checksum and be finite.
        """
        directory = resolve(repo_id_or_path, subfolder, revision, cache_dir, local_files_only, token)
        config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights):
            if not path.is_file():
                raise FileNotFoundError(f"No A2ATS codebooks in {directory}: {path.name} is missing.")
        config = _read_config(config_path)
        if _sha256(weights) != config["sha256"]:
            raise ValueError(f"{weights} does not match the checksum in {config_path.name}: truncated or altered.")
        try:
            tensors = load_file(str(weights))
        except Exception as error:  # safetensors refuses anything else, pickles included
            raise ValueError(f"{weights} is not a valid safetensors file: {error}") from None
        if sorted(tensors) != sorted(TENSORS):
            raise ValueError(f"{weights} holds tensors {sorted(tensors)}, expected {sorted(TENSORS)}")
        _check_config_shapes(config, tensors, config_path)
        try:
            return cls(
                whitener=tensors["whitener"],
                whitened_centroids=tensors["whitened_centroids"],
                fingerprint=config["fingerprint"],
                window=config["window"],
                offset=config["offset"],
                sink=config["sink"],
                calibration=config.get("calibration", {}),
                keys=config["keys"],
                weights_signature=config["weights_signature"],
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"{directory}: {error}") from None

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
        return push_to_hub(self, repo_id, subfolder, revision, private, token, commit_message, create_pr)

    def validate(self, model_config: Any, attention: Any = None) -> None:
        """Raise ``ValueError`` naming every field where these codebooks do not match ``model_config``.

        Given an attention module, also compare the weights signature of its layer (``attention.layer_idx``; a
        layer A2ATS does not serve is skipped) with the one recorded at calibration: a fine-tune or another revision
        of the same architecture is refused. Meant to be called once per layer (a few ms for a large layer); a
        layer whose key weight is not floating point (packed, quantized), now or at calibration, is skipped with a
        warning, once.
        """
        expected = fingerprint(model_config)
        recorded_fp = {"a2ats_layers": self.layers, "sliding_window": None, **self.fingerprint}
        mismatches = [
            f"{key}: codebooks have {recorded_fp.get(key)!r}, model has {value!r}"
            for key, value in expected.items()
            if recorded_fp.get(key) != value
        ]
        layers, kv_heads, dim = self.whitener.shape[:3]
        shape = (len(expected["a2ats_layers"]), expected["num_key_value_heads"], expected["head_dim"])
        if (layers, kv_heads, dim) != shape:
            mismatches.append(f"tensor shape (layers, kv_heads, head_dim): codebooks have {(layers, kv_heads, dim)}, "
                              f"model has {shape}")
        if mismatches:
            raise ValueError("These A2ATS codebooks were built for another model:\n  " + "\n  ".join(mismatches))
        if attention is None or self.weights_signature is None:
            return
        idx = getattr(attention, "layer_idx", None)
        if not isinstance(idx, int):
            raise ValueError(f"{type(attention).__name__} has no layer_idx: cannot tell which layer's weights to check")
        if idx not in self.layers:
            return
        recorded = self.weights_signature["layers"][self.layers.index(idx)]
        weight = _key_weight(attention)
        if recorded is None or weight is None:
            if not self._warned_unchecked:
                self._warned_unchecked = True
                when = "at calibration" if recorded is None else "in this model"
                warnings.warn(f"Layer {idx}'s key projection weight is not a plain floating-point tensor {when} "
                              "(packed, quantized or offloaded), so its weights signature cannot be compared: A2ATS "
                              "cannot tell whether these codebooks were calibrated on these weights (warned once).",
                              stacklevel=2)
            return
        deviation = _layer_deviation(recorded, weight)
        if deviation > SIGNATURE_TOLERANCE:
            raise ValueError(
                f"These A2ATS codebooks were calibrated on other weights: the weights_signature of layer {idx} (its "
                f"key projection) differs from this model's by {deviation:.3g} of the weight's norm (tolerance "
                f"{SIGNATURE_TOLERANCE:g}): another revision or a fine-tune (or a float32 checkpoint calibrated in "
                "bfloat16 and served in float16, or the reverse). Re-calibrate on this model (a2ats calibrate MODEL "
                "--text TEXTS --out DIR, or a2ats_hf.calibrate)."
            )


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    bad = ~torch.isfinite(tensor)
    if bad.any():
        first = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite values (NaN or inf), the first at index {first}")


def _read_config(path: Path) -> dict:
    """The config JSON, refused with the path and field named when it is unreadable, of another format version,
    or lacks a required field."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON (empty, truncated or damaged?): {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    version = config.get("format_version")
    if version is None:
        raise ValueError(f"{path} lacks the required field 'format_version'")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version < FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version={version}, from an older a2ats_hf whose weights signature checked only "
                f"the first layer's norm; this a2ats_hf reads format {FORMAT_VERSION}. Re-calibrate the codebooks "
                "(a2ats calibrate MODEL --text TEXTS --out DIR) to record the per-layer signature."
            )
        raise ValueError(f"{path} has format_version={version!r}, this a2ats_hf reads {FORMAT_VERSION}: upgrade "
                         "a2ats_hf to read it.")
    missing = [name for name in REQUIRED if name not in config]
    if isinstance(config.get("fingerprint"), dict):
        missing += [f"fingerprint.{name}" for name in FINGERPRINT_FIELDS if name not in config["fingerprint"]]
    elif "fingerprint" in config:
        raise ValueError(f"{path}: fingerprint must be a JSON object, got {config['fingerprint']!r:.100}")
    if missing:
        raise ValueError(f"{path} lacks the required field{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
    if config["weights_signature"] is None:
        raise ValueError(f"{path}: weights_signature is null; codebooks are only saved with one (re-calibrate)")
    sha = config["sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and all(ch in "0123456789abcdef" for ch in sha)):
        raise ValueError(f"{path}: sha256 must be 64 lowercase hex digits, got {sha!r:.100}")
    return config


def _check_config_shapes(config: dict, tensors: dict, path: Path) -> None:
    """ValueError naming every config field that disagrees with the tensors' shapes."""
    fp = config["fingerprint"]
    w, c = tensors["whitener"], tensors["whitened_centroids"]
    if w.dim() != 4 or c.dim() != 4:
        raise ValueError(f"{path.parent / WEIGHTS_NAME}: whitener {tuple(w.shape)} and whitened_centroids "
                         f"{tuple(c.shape)} must both be 4-D")
    layers = fp["a2ats_layers"]
    n_layers = fp["num_hidden_layers"]
    problems = []
    if not (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            and layers == sorted(set(layers)) and isinstance(n_layers, int)
            and all(0 <= i < n_layers for i in layers)):
        problems.append(f"fingerprint.a2ats_layers={layers!r} must be increasing layer indices below "
                        f"num_hidden_layers={n_layers!r}")
    else:
        for name, value, actual in (("n_centroids", config["n_centroids"], c.shape[-2]),
                                    ("len(fingerprint.a2ats_layers)", len(layers), c.shape[0]),
                                    ("fingerprint.num_key_value_heads", fp["num_key_value_heads"], c.shape[1]),
                                    ("fingerprint.head_dim", fp["head_dim"], c.shape[-1])):
            if value != actual:
                problems.append(f"{name}={value!r} but the tensors have {actual}")
    if problems:
        raise ValueError(f"{path} disagrees with {WEIGHTS_NAME}: " + "; ".join(problems))
