"""Graph-captured decoding: a decode step whose every read and write has a fixed address and shape, replayed as a
CUDA graph per (batch, width bucket), or as graph pieces around the CPU attention of layers whose K/V is offloaded.

A decode step in eager mode issues ~60 small operations per layer from Python, so on a GPU it is bound by the host.
Its capture-ready form (:mod:`a2ats_hf.step`, :class:`~a2ats_hf.step.StaticStep`) reads and writes fixed addresses
over a fixed width, so the same captured graph serves every step until the length crosses the width's bucket
(:data:`~a2ats_hf.step.BUCKET` columns). :func:`capture_decoding` installs
:class:`GraphRunner` as the model's forward: one-token steps over an :class:`~a2ats_hf.cache.A2ATSCache` whose
layers all keep their K/V on one GPU (``offload="none"``, or ``"auto"`` where everything fits) with ``max_length``
set run that way; every other call (the prompt, CPUs) goes to the model's own forward. Layers whose K/V is in
CPU memory (``offload="cpu"``, or ``"auto"`` past the GPU's budget) split the step into pieces, as vLLM captures
its "piecewise" graphs around attention: a piece ends where such a layer hands its selection to the CPU, and the
runner replays piece after piece, between two of them waiting for that layer's selection (the step's only host
waits, one per offloaded layer) and running its CPU attention, whose output the next piece copies back.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .handoff import hand_off
from .step import BUCKET, StaticStep, bucket_width

if TYPE_CHECKING:
    from .cache import A2ATSCache

GRAPH_SCORERS = ("wrope", "distance", "window")  # scorers with a capture-ready step (the baselines have none)


@dataclass
class Captured:
    """One captured step: its graph pieces (one where no layer is offloaded) and the CPU work between two of them,
    static inputs, output, and the buffers' addresses it was captured over."""

    pieces: list[torch.cuda.CUDAGraph]
    between: list[Callable[[], None]]
    inputs: dict[str, torch.Tensor]
    output: object
    addresses: tuple[int, ...]

    def replay(self, device: torch.device) -> None:
        """Each piece in turn, each offloaded layer's CPU part between two (after the piece's copies of its
        selection, which the hand-off's ``ready`` event marks)."""
        ready = hand_off(device).ready if self.between else None
        for i, piece in enumerate(self.pieces):
            piece.replay()
            if i < len(self.between):
                ready.record(torch.cuda.current_stream(device))
                self.between[i]()


class GraphRunner:
    """The model's forward, replaying captured decode steps where :meth:`applies` (see the module's docstring).

    A (batch, width) is first run eagerly through the capture-ready path (which compiles and allocates what the
    step needs), captured the next time, replayed after. ``capture=False`` always runs the capture-ready step
    eagerly (for tests on a CPU: the same arithmetic without a graph); ``bucket`` sets the widths' granularity."""

    def __init__(self, model: nn.Module, capture: bool = True, bucket: int = BUCKET):
        self.forward, self.capture, self.bucket = model.forward, capture, bucket
        functools.update_wrapper(self, self.forward)  # its signature: generate and cache_argument read it
        self.captured: dict[tuple, Captured] = {}
        self.statics: dict[int, StaticStep] = {}  # by width, for the validity record they were built from
        self.warm: set[tuple] = set()  # (batch, width, keywords) run once: the next step captures
        self.uncapturable: set[tuple] = set()  # those whose capture failed: run without a graph
        self.pool = None
        self.stream: torch.cuda.Stream | None = None  # the side stream graphs are captured on
        self.counts = {"replayed": 0, "captured": 0, "static eager": 0, "forward": 0}

    def __call__(self, *args, **kwargs):
        if args:  # generate passes keywords; positional input_ids are named here
            kwargs = {"input_ids": args[0], **kwargs}
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if not self.applies(cache, kwargs):
            self.counts["forward"] += 1
            return self.forward(**kwargs)
        return self.step(cache, kwargs)

    def applies(self, cache, kwargs: dict) -> bool:
        """Whether this call is a one-token decode step the capture-ready path serves."""
        ids, positions = kwargs.get("input_ids"), kwargs.get("position_ids")
        layers = getattr(cache, "a2ats_layers", None)  # an A2ATSCache (this module is imported by cache.py)
        if layers is None or ids is None or positions is None or ids.shape[1] != 1:
            return False
        if (kwargs.get("inputs_embeds") is not None or kwargs.get("output_attentions")
                or kwargs.get("output_hidden_states")):
            return False
        n = cache.get_seq_length()
        if n == 0 or cache.scorer.name not in GRAPH_SCORERS or cache.validity is None or cache.observers:
            return False
        if len(layers) != len(cache.layers):
            return False
        device = layers[0].device
        if any(layer.device != device for layer in layers) or (self.capture and device.type != "cuda"):
            return False
        return min(capacity(layer) for layer in layers) > n

    def step(self, cache: "A2ATSCache", kwargs: dict):
        """One decode step through the capture-ready path (see the class docstring)."""
        layers, n = cache.a2ats_layers, cache.get_seq_length()
        batch = kwargs["input_ids"].shape[0]
        width = bucket_width(n + 1, min(capacity(layer) for layer in layers), self.bucket)
        cache_name = "past_key_values" if "past_key_values" in kwargs else "cache"
        rest = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "attention_mask")}
        tensors = {k: v for k, v in rest.items() if isinstance(v, torch.Tensor)}
        static = cache.static = self.static_step(cache, batch, width)
        key = (batch, width, layers[0].sinks_filling(),  # filling sinks: a graph of its own, with their writes
               tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in tensors.items())),
               tuple(sorted((k, repr(v)) for k, v in rest.items() if k not in tensors)))
        addresses = self.addresses(cache, static)
        captured = self.captured.get(key)
        if captured is None or captured.addresses != addresses:  # new, or the cache's buffers moved (a reset)
            captured = self.captured[key] = Captured([], [], {k: v.clone() for k, v in tensors.items()}, None,
                                                     addresses)
            self.warm.discard(key)
        for name, value in tensors.items():
            captured.inputs[name].copy_(value)
        static.column.fill_(n)
        static.length.fill_(n + 1)

        def run():
            return self.forward(**{**rest, **captured.inputs, "attention_mask": None, cache_name: cache})

        try:
            if not captured.pieces and self.capture and key in self.warm and key not in self.uncapturable:
                try:
                    self.capture_step(cache, captured, run)
                except RuntimeError as error:  # an operation this model runs that CUDA cannot capture
                    self.uncapturable.add(key)
                    warnings.warn(f"a2ats: capturing the decode step failed ({error!s:.200}); this batch and width "
                                  "decode through the capture-ready path without a graph.")
            if not captured.pieces:
                output = run()
                self.warm.add(key)
                self.counts["static eager"] += 1
            else:
                captured.replay(layers[0].device)
                output = captured.output
                cache.stats.steps, cache.stats.layer_steps = (cache.stats.steps + 1,
                                                              cache.stats.layer_steps + len(layers))
                self.counts["replayed"] += 1
        finally:
            cache.static = None
        for layer in layers:  # the host's counts, which the step's writes at the device's column do not move
            layer.store.length += 1
            layer.scorer.stepped()
        result = copy.copy(output)
        result.logits = output.logits.clone()  # the graph's output buffer is overwritten by the next replay
        return result

    def static_step(self, cache: "A2ATSCache", batch: int, width: int) -> StaticStep:
        """The :class:`StaticStep` of this width, kept (same addresses) while the cache's validity record stays."""
        static = next(iter(self.statics.values()), None)
        if static is None or static.source is not cache.validity:
            layer = cache.a2ats_layers[0]
            prompt_valid = torch.ones(batch, capacity(layer), dtype=torch.bool, device=layer.device)
            prompt_valid[:, : cache.validity.shape[1]] = cache.validity
            column = torch.zeros(1, dtype=torch.long, device=layer.device)
            self.statics = {}
            static = StaticStep(column, column + 1, width, prompt_valid, cache.validity)
        if width not in self.statics:
            self.statics[width] = StaticStep(static.column, static.length, width, static.prompt_valid, static.source)
        return self.statics[width]

    def capture_step(self, cache: "A2ATSCache", captured: Captured, run) -> None:
        """Capture ``run()`` into CUDA graph pieces sharing one memory pool with the runner's other graphs (replayed
        in the order captured, as a shared pool needs), a new piece after each offloaded layer's hand-off to the
        CPU (:meth:`~a2ats_hf.step.StaticStep.on_cpu`). Capturing records the step without running it, but runs its
        Python once: the host's statistics are restored."""
        stats = (cache.stats.steps, cache.stats.layer_steps)
        pieces, between = [torch.cuda.CUDAGraph()], []

        def breaks(work: Callable[[], None]) -> None:
            pieces[-1].capture_end()
            between.append(work)
            pieces.append(torch.cuda.CUDAGraph())
            pieces[-1].capture_begin(pieces[0].pool())

        torch.cuda.synchronize()
        self.stream = self.stream or torch.cuda.Stream()
        cache.static.breaks = breaks
        try:
            with torch.cuda.stream(self.stream):
                pieces[0].capture_begin(*(() if self.pool is None else (self.pool,)))
                try:
                    captured.output = run()
                finally:
                    pieces[-1].capture_end()
        finally:
            cache.static.breaks = None
            cache.stats.steps, cache.stats.layer_steps = stats
        self.pool = pieces[0].pool()
        captured.pieces, captured.between = pieces, between
        self.counts["captured"] += 1

    @staticmethod
    def addresses(cache: "A2ATSCache", static: StaticStep) -> tuple[int, ...]:
        """The data pointers a captured step reads and writes: its graph is valid while they stay."""
        tensors = [static.column, static.prompt_valid, static.columns, cache.stats.selected_counts,
                   cache.stats.device_totals]
        for layer in cache.a2ats_layers:
            tensors += [*layer.store.held(), layer.code_buffer, layer.local_keys, layer.local_values,
                        layer.first_token, layer.histogram, layer.sink_valid, *layer.scorer.held()]
        offloaded = [layer.device for layer in cache.a2ats_layers if not layer.store.resident]
        if offloaded and offloaded[0].type == "cuda":  # the pinned hand-off buffers (the layers share one device)
            tensors += list(hand_off(offloaded[0]).buffers.values())
        return tuple(None if t is None else t.data_ptr() for t in tensors)


def capacity(layer) -> int:
    """Columns a capture-ready step of ``layer`` can address: its code buffer's, and its device store's where it
    keeps the K/V on the device (a CPU store grows by blocks between pieces)."""
    return min(layer.code_buffer.shape[-1], layer.store.keys.shape[2] if layer.store.resident else math.inf)


def capture_decoding(model: nn.Module, capture: bool | None = None, bucket: int = BUCKET,
                     compile_layers: bool = False) -> nn.Module:
    """Install :class:`GraphRunner` as ``model``'s forward (in place; returns the model): one-token decode steps
    over an A2ATSCache that keeps every layer's K/V on one GPU, with ``max_length`` set, run as CUDA graphs, through
    the usual ``model.generate(...)``. ``capture`` (default: on a CUDA model) False runs the same capture-ready
    step without graphs. ``compile_layers`` also fuses the model's own pieces around the attention
    (:func:`compile_around_attention`). :func:`release_decoding` undoes both."""
    if compile_layers:
        compile_around_attention(model)
    if isinstance(model.forward, GraphRunner):
        return model
    device = next(model.parameters()).device
    model.forward = GraphRunner(model, device.type == "cuda" if capture is None else capture, bucket)
    return model


def release_decoding(model: nn.Module) -> nn.Module:
    """Give ``model`` its own forward back (and free the captured graphs), and its modules their own forward where
    :func:`compile_around_attention` compiled them."""
    if isinstance(model.forward, GraphRunner):
        del model.forward
    for module in model.modules():
        if Compiled.on(module):
            del module.forward
    return model


class Compiled:
    """A module's forward under ``torch.compile``, set on the module (so :func:`release_decoding` can tell it from
    the module's own)."""

    def __init__(self, forward):
        self.compiled = torch.compile(forward)
        functools.update_wrapper(self, forward)

    def __call__(self, *args, **kwargs):
        return self.compiled(*args, **kwargs)

    @staticmethod
    def on(module: nn.Module) -> bool:
        """Whether ``module``'s forward is one of these."""
        return isinstance(module.__dict__.get("forward"), Compiled)


def compile_around_attention(model: nn.Module) -> list[str]:
    """``torch.compile`` (Inductor, no graphs of its own) every decoder layer's modules besides its attention (the
    norms and the MLP) and the final norm, in place (once: those compiled already stay); returns their names.

    At batch 1 a captured step is ~1,900 kernels, ~1,500 of them the model's own small ones (an RMSNorm is 8, an MLP
    5): fused, a norm is one and the gaps between kernels go with them. The attention and the cache stay eager code
    that the graph runner captures. Inductor orders the norms' sums its own way, so logits may differ from the eager
    model's in the last bits (greedy tokens too, where two are that close)."""
    targets = [(f"{layer_name}.{name}", child) for layer_name, layer in model.named_modules()
               if isinstance(getattr(layer, "self_attn", None), nn.Module)
               for name, child in layer.named_children() if child is not layer.self_attn]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(getattr(decoder, "norm", None), nn.Module):
        targets.append(("norm", decoder.norm))
    if not targets:
        raise ValueError(f"compile_layers: found no decoder layer with a self_attn module in {type(model).__name__}")
    for _, module in targets:
        if not Compiled.on(module):  # a second call (a second cache for the same model) keeps the first's
            module.forward = Compiled(module.forward)
    return [name for name, _ in targets]
