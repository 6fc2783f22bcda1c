"""Graph-captured decoding: a decode step whose every read and write has a fixed address and shape, replayed as a
CUDA graph per (batch, width bucket), or as graph pieces around the CPU attention of layers whose K/V is offloaded.

A decode step in eager mode issues ~60 small operations per layer from Python, so on a GPU it is bound by the host.
Its capture-ready form (:mod:`a2ats_hf.step`, :class:`~a2ats_hf.step.StaticStep`) reads and writes fixed addresses
over a fixed width, so the same captured graph serves every step until the length crosses the width's bucket
(:data:`~a2ats_hf.step.BUCKET` columns). :func:`capture_decoding` installs
:class:`GraphRunner` as the model's forward: one-token steps over an :class:`~a2ats_hf.cache.A2ATSCache` whose
layers all keep their K/V on one GPU (``offload="none"``, or ``"auto"`` where everything fits) with ``max_length``
set run that way; every other call (the prompt, CPUs) goes to the model's own forward. Layers whose K/V is in
CPU memory (``offload="cpu"``, or ``"auto"`` past the GPU's budget) and whose rows the CPU attends (unless
``gpu_share=1``: the GPU reads them in place, and the step stays one graph) split the step into pieces, as vLLM captures
its "piecewise" graphs around attention: a piece ends where such a layer hands its selection to the CPU, and the
runner replays piece after piece, between two of them waiting for that layer's selection (the step's only host
waits, one per offloaded layer) and running its CPU attention, whose output the next piece copies back. With two
rows or more, such a step runs as two halves of the batch, as NEO (MLSys 2025) pipelines them: each half decodes
over a view of its rows of the cache and is captured apart, and their pieces replay interleaved, so the GPU runs one
half's next layer while the CPU attends the other half's selected rows.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
import weakref
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
    """One captured step (of the whole batch, or of one part of a pipelined step): its graph pieces (one where no
    layer is offloaded) and the CPU work between two of them, static inputs, output, and the buffers' addresses it
    was captured over; ``ready`` is its hand-off's event, which marks a piece's copies of its selection."""

    pieces: list[torch.cuda.CUDAGraph]
    between: list[Callable[[], None]]
    inputs: dict[str, torch.Tensor]
    output: object
    addresses: tuple[int, ...]
    ready: torch.cuda.Event | None = None


def replay(steps: list[Captured], device: torch.device) -> None:
    """Replay captured steps of the same layers together, piece by piece: the first piece of each, then for each
    offloaded layer and step in turn, its CPU part (after its piece's selection landed) and its next piece. With
    two parts of a batch, the GPU runs one part's next piece while the CPU attends the other's selected rows."""
    stream = torch.cuda.current_stream(device)
    for captured in steps:
        captured.pieces[0].replay()
        if captured.between:
            captured.ready.record(stream)
    for i in range(len(steps[0].between)):
        for captured in steps:
            captured.between[i]()
            captured.pieces[i + 1].replay()
            if i + 1 < len(captured.between):
                captured.ready.record(stream)


ROW_INPUTS = ("input_ids", "position_ids")  # a step's inputs with a row per batch row (cache_position has none)


class GraphRunner:
    """The model's forward, replaying captured decode steps where :meth:`applies` (see the module's docstring).

    A (batch, width) is first run eagerly through the capture-ready path (which compiles and allocates what the
    step needs), captured the next time, replayed after. ``capture=False`` always runs the capture-ready step
    eagerly (for tests on a CPU: the same arithmetic without a graph); ``bucket`` sets the widths' granularity.
    ``halves`` (where a layer's K/V is in CPU memory and the batch has two rows or more) runs the step as two
    halves of the batch, each over a view of its rows of the cache (:meth:`A2ATSCache.rows`), captured apart and
    replayed together (:func:`replay`): the CPU attends one half's rows while the GPU runs the other half's
    layer."""

    def __init__(self, model: nn.Module, capture: bool = True, bucket: int = BUCKET, halves: bool = True):
        self.forward, self.capture, self.bucket, self.halves = model.forward, capture, bucket, halves
        functools.update_wrapper(self, self.forward)  # its signature: generate and cache_argument read it
        self.captured: dict[tuple, Captured] = {}
        self.statics: dict[int, StaticStep] = {}  # by width, for the validity record they were built from
        self.part_statics: dict[tuple[int, int], StaticStep] = {}  # by (lane, width): the halves' rows of those
        self.split: tuple | None = None  # ((batch, edits, length) made for, the halves' views, a weakref to the cache)
        self.warm: set[tuple] = set()  # (batch, width, keywords) run once: the next step captures
        self.uncapturable: set[tuple] = set()  # those whose capture failed: run without a graph
        self.pools: dict[int, tuple] = {}  # by lane: the halves' graphs may not share memory, as they interleave
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
        static = self.static_step(cache, batch, width)
        parts = self.parts(cache, batch, tensors)
        steps = []  # (part's cache, its Captured, its run, its key)
        for lane, (part, rows) in enumerate(parts):
            part.static = static if part is cache else self.part_static(static, lane, rows)
            inputs = {k: v[rows] if k in ROW_INPUTS else v for k, v in tensors.items()}
            key = (lane, batch, width, layers[0].sinks_filling(),  # filling sinks: a graph of its own (their writes)
                   tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in inputs.items())),
                   tuple(sorted((k, repr(v)) for k, v in rest.items() if k not in tensors)))
            addresses = self.addresses(part, part.static)
            captured = self.captured.get(key)
            if captured is None or captured.addresses != addresses:  # new, or the cache's buffers moved (a reset)
                captured = self.captured[key] = Captured([], [], {k: v.clone() for k, v in inputs.items()}, None,
                                                         addresses)
                self.warm.discard(key)
            for name, value in inputs.items():
                captured.inputs[name].copy_(value)

            def run(part=part, captured=captured):
                return self.forward(**{**rest, **captured.inputs, "attention_mask": None, cache_name: part})

            steps.append((part, captured, run, key))
        for layer in layers:  # tokens an eager step staged reach their blocks first: a replay places none
            layer.store.place_staged()
        static.column.fill_(n)
        static.length.fill_(n + 1)
        try:
            for part, captured, run, key in steps:
                if not captured.pieces and self.capture and key in self.warm and key not in self.uncapturable:
                    try:
                        self.capture_step(part, captured, run, key[0])
                    except RuntimeError as error:  # an operation this model runs that CUDA cannot capture
                        self.uncapturable.add(key)
                        warnings.warn(f"a2ats: capturing the decode step failed ({error!s:.200}); this batch and "
                                      "width decode through the capture-ready path without a graph.")
            replayed = all(captured.pieces for _, captured, _, _ in steps)
            if replayed:
                replay([captured for _, captured, _, _ in steps], layers[0].device)
                outputs = [captured.output for _, captured, _, _ in steps]
                self.counts["replayed"] += 1
            else:
                outputs = []
                for part, captured, run, key in steps:
                    if captured.pieces:
                        replay([captured], layers[0].device)
                        outputs.append(captured.output)
                    else:
                        outputs.append(run())
                        self.warm.add(key)
                self.counts["static eager"] += 1
            if replayed or len(parts) > 1:  # (an eager step of the whole cache counted itself)
                cache.stats.steps, cache.stats.layer_steps = (cache.stats.steps + 1,
                                                              cache.stats.layer_steps + len(layers))
        finally:
            for part, _ in parts:
                part.static = None
        written = [layer.store for layer in layers if layer.attended_on_device()]
        if written and layers[0].device.type == "cuda":  # the step wrote its token into their pinned blocks: a
            landed = torch.cuda.Event()  # host read of them waits for it
            landed.record(torch.cuda.current_stream(layers[0].device))
            for store in written:
                store.landed = landed
        for part, _ in parts:  # the host's counts, which the step's writes at the device's column do not move
            for layer in part.a2ats_layers:
                layer.store.length += 1
                layer.scorer.stepped()
        if len(parts) > 1:
            for layer in layers:
                layer.store.length += 1
            self.split = ((batch, cache.edits, n + 1), *self.split[1:])
        result = copy.copy(outputs[0])
        result.logits = torch.cat([output.logits for output in outputs])  # a copy: the next replay overwrites them
        if len(parts) > 1 and "past_key_values" in result:
            result.past_key_values = cache
        return result

    def parts(self, cache: "A2ATSCache", batch: int, tensors: dict) -> list[tuple["A2ATSCache", slice]]:
        """The step's parts, each a cache and the rows of the inputs it takes: two halves of the batch where
        ``halves`` applies (views of the cache's rows, kept from step to step while only this runner's steps
        moved the cache), else the whole cache."""
        layers = cache.a2ats_layers
        if (not self.halves or batch < 2 or all(layer.store.resident or layer.attended_on_device() for layer in layers)
                or not set(tensors) <= {*ROW_INPUTS, "cache_position"}):
            return [(cache, slice(None))]
        made_for = (batch, cache.edits, cache.get_seq_length())
        if self.split is None or self.split[0] != made_for or self.split[2]() is not cache:
            for layer in layers:  # its state would go stale while the halves' scorers move theirs on
                layer.scorer.forget()
            middle = -(-batch // 2)
            self.split = (made_for, [(cache.rows(0, middle, 0), slice(0, middle)),
                                     (cache.rows(middle, batch, 1), slice(middle, batch))], weakref.ref(cache))
        return self.split[1]

    def part_static(self, static: StaticStep, lane: int, rows: slice) -> StaticStep:
        """``static``'s rows ``rows`` for the half ``lane`` of a pipelined step (the same column and length), kept
        while ``static`` is."""
        part = self.part_statics.get((lane, static.width))
        if part is None or part.column is not static.column or part.source is not static.source:
            part = self.part_statics[lane, static.width] = StaticStep(
                static.column, static.length, static.width, static.prompt_valid[rows], static.source)
        return part

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

    def capture_step(self, cache: "A2ATSCache", captured: Captured, run, lane: int = 0) -> None:
        """Capture ``run()`` into CUDA graph pieces sharing one memory pool with the runner's other graphs of the
        same ``lane`` (the halves of a step interleave their pieces, so they may not share one), a new piece after
        each offloaded layer's hand-off to the CPU (:meth:`~a2ats_hf.step.StaticStep.on_cpu`). Capturing records
        the step without running it, but runs its Python once: the host's statistics are restored."""
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
                pieces[0].capture_begin(*((self.pools[lane],) if lane in self.pools else ()))
                try:
                    captured.output = run()
                finally:
                    pieces[-1].capture_end()
        finally:
            cache.static.breaks = None
            cache.stats.steps, cache.stats.layer_steps = stats
        self.pools[lane] = pieces[0].pool()
        captured.pieces, captured.between = pieces, between
        captured.ready = hand_off(cache.a2ats_layers[0].device, cache.lane).ready
        self.counts["captured"] += 1

    @staticmethod
    def addresses(cache: "A2ATSCache", static: StaticStep) -> tuple[int, ...]:
        """The data pointers a captured step reads and writes: its graph is valid while they stay."""
        tensors = [static.column, static.prompt_valid, static.columns, cache.stats.selected_counts,
                   cache.stats.device_totals]
        for layer in cache.a2ats_layers:
            tensors += [*layer.store.held(), layer.code_buffer, layer.local_keys, layer.local_values,
                        layer.first_token, layer.histogram, layer.sink_valid, *layer.scorer.held()]
            tensors += [] if layer.row_cache is None else list(layer.row_cache.tensors())
        offloaded = [layer.device for layer in cache.a2ats_layers if not layer.store.resident]
        if offloaded and offloaded[0].type == "cuda":  # the pinned hand-off buffers (the layers share one device)
            tensors += list(hand_off(offloaded[0], cache.lane).buffers.values())
        return tuple(None if t is None else t.data_ptr() for t in tensors)


def capacity(layer) -> int:
    """Columns a capture-ready step of ``layer`` can address: its code buffer's, and its device store's where it
    keeps the K/V on the device, or its CPU store's one block where the GPU writes and reads it in place (a CPU
    store the CPU attends grows by blocks between pieces)."""
    store = layer.store
    bound = store.keys.shape[2] if store.resident else store.block_size if layer.attended_on_device() else math.inf
    return min(layer.code_buffer.shape[-1], bound)


def capture_decoding(model: nn.Module, capture: bool | None = None, bucket: int = BUCKET,
                     compile_layers: bool = False, halves: bool = True) -> nn.Module:
    """Install :class:`GraphRunner` as ``model``'s forward (in place; returns the model): one-token decode steps
    over an A2ATSCache whose layers are on one GPU, with ``max_length`` set, run as CUDA graphs (in pieces around
    the CPU attention of layers whose K/V is in CPU memory), through the usual ``model.generate(...)``.
    ``capture`` (default: on a CUDA model) False runs the same capture-ready step without graphs.
    ``compile_layers`` also fuses the model's own pieces around the attention (:func:`compile_around_attention`).
    ``halves`` False runs a step with offloaded layers as one batch, not as two halves in a pipeline.
    :func:`release_decoding` undoes both."""
    if compile_layers:
        compile_around_attention(model)
    if isinstance(model.forward, GraphRunner):
        model.forward.halves = halves
        return model
    device = next(model.parameters()).device
    model.forward = GraphRunner(model, device.type == "cuda" if capture is None else capture, bucket, halves)
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
