"""The Triton key encoder and windowed-RoPE lookup table against the torch references, on random inputs of awkward
sizes (under TRITON_INTERPRET=1 without a GPU) and on real SmolLM2 keys and queries."""

from __future__ import annotations

import pytest
import torch

from a2ats_hf import A2ATSCache, cache_argument, kernels
from a2ats_hf.kernels import reference, triton_codes

from conftest import DEVICE, compile_for_hopper

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and not __import__("os").environ.get("TRITON_INTERPRET"),
    reason="needs a GPU or TRITON_INTERPRET=1 (conftest sets it without a GPU)",
)
KERNEL_DEVICE = DEVICE if DEVICE.type == "cuda" else torch.device("cpu")


def to(t):
    return None if t is None else t.to(KERNEL_DEVICE)


def random_rotation(g: torch.Generator, b: int, t: int, rot: int) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.rand(b, 1, t, rot // 2, generator=g) * 6.3
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def assert_nearest(codes: torch.Tensor, expected: torch.Tensor, keys, rotation, whitener, centroids):
    """Codes equal the reference's, or (where rounding order decides between near-equal centroids, or torch breaks
    an exact tie another way) name a centroid as near as the reference's to float32 rounding. Both compute
    ||c||^2 - 2 z.c in float32, whose rounding scales with ||z||^2 + ||c||^2, not with the distance itself (real
    SmolLM2 keys sit far from the origin in the whitened space)."""
    codes, expected = codes.cpu().long(), expected.cpu().long()
    if torch.equal(codes, expected):
        return
    x = keys.double() if rotation is None else reference.apply_rope(keys.double(), *(r.double() for r in rotation))
    z = x.transpose(0, 1).flatten(1, 2) @ whitener.double()  # [H, B*T, D]
    dist = torch.cdist(z, centroids.double()).square()  # [H, B*T, M]
    flat = lambda c: c.transpose(0, 1).flatten(1)[..., None]  # noqa: E731
    chosen, best = dist.gather(-1, flat(codes)), dist.gather(-1, flat(expected))
    norms = centroids.double().square().sum(-1)[:, None].expand(-1, z.shape[1], -1)  # [H, B*T, M]
    scale = z.square().sum(-1, keepdim=True) + norms.gather(-1, flat(expected))
    assert ((chosen - best).abs() <= 1e-5 * scale).all()


@pytest.mark.parametrize(
    "b, h, t, d, m, rot, dtype",
    [(2, 3, 1, 64, 37, 64, torch.float32), (3, 2, 2, 80, 300, 80, torch.bfloat16),
     (1, 4, 5, 24, 1000, 16, torch.float32),
     (2, 1, 1, 32, 16, 0, torch.float16)],
    ids=["smollm2-head", "d80-bf16", "partial-rotary", "post-rope-codebooks"],
)
def test_encode_matches_reference(b, h, t, d, m, rot, dtype):
    g = torch.Generator().manual_seed(m + d)
    keys = torch.randn(b, h, t + 2, d, generator=g).to(dtype)[:, :, 2:]  # a strided view, as the model's
    whitener = torch.randn(h, d, d, generator=g) / d**0.5 + torch.eye(d)
    centroids = torch.randn(h, m, d, generator=g)
    centroids[:, 0] = centroids[:, -1] = 0.1 * centroids[:, 0]  # duplicates near the origin, nearest for many keys
    norms = centroids.pow(2).sum(-1)[:, None, :]
    rotation = random_rotation(g, b, t, rot) if rot else None
    out = torch.full((b, h, t + 3), 7, dtype=torch.uint16)  # the new keys' slice of a longer code buffer
    expected = reference.encode_keys(keys, rotation, whitener, centroids, norms, out.clone()[:, :, 1 : t + 1])
    got = to(out)
    triton_codes.encode_keys(to(keys), rotation and tuple(map(to, rotation)), to(whitener), to(centroids), to(norms),
                             got[:, :, 1 : t + 1])
    assert (got[:, :, 0] == 7).all() and (got[:, :, t + 1 :] == 7).all(), "wrote outside its slice"
    assert_nearest(got[:, :, 1 : t + 1], expected, keys.float(), rotation, whitener, centroids)
    assert (got == 0).any() and not (got == m - 1).any(), "the first of equal centroids must win"


def test_encode_writes_at_a_device_column():
    """A capture-ready step's key: its code written at the column a device tensor holds, in the whole buffer, by
    kernel and reference alike, and nowhere else."""
    g = torch.Generator().manual_seed(5)
    b, h, d, m = 2, 3, 64, 37
    keys = torch.randn(b, h, 1, d, generator=g)
    whitener = torch.randn(h, d, d, generator=g) / d**0.5 + torch.eye(d)
    centroids = torch.randn(h, m, d, generator=g)
    norms = centroids.pow(2).sum(-1)[:, None, :]
    rotation = random_rotation(g, b, 1, d)
    buffer, column = torch.full((b, h, 10), 7, dtype=torch.uint16), torch.tensor([4])
    expected = reference.encode_keys(keys, rotation, whitener, centroids, norms, buffer.clone(), column)
    alone = reference.encode_keys(keys, rotation, whitener, centroids, norms, torch.zeros(b, h, 1, dtype=torch.uint16))
    assert (torch.equal(expected[:, :, 4:5], alone) and (expected[:, :, :4] == 7).all()
            and (expected[:, :, 5:] == 7).all())
    got = triton_codes.encode_keys(to(keys), tuple(map(to, rotation)), to(whitener), to(centroids), to(norms),
                                   to(buffer.clone()), to(column))
    assert (got[:, :, :4].cpu() == 7).all() and (got[:, :, 5:].cpu() == 7).all(), "wrote outside its column"
    assert_nearest(got[:, :, 4:5], alone, keys, rotation, whitener, centroids)


@pytest.mark.parametrize("b, h, d, m, dtype", [(1, 2, 64, 1000, torch.float32), (2, 2, 128, 4096, torch.bfloat16)],
                         ids=["eight-splits", "llama-head-four-splits"])
def test_encode_splits_the_centroids_of_few_keys(b, h, d, m, dtype):
    """A decode step's few keys spread over programs that each scan a split of the centroids (8 and 4 splits here):
    the codes are the reference's, and of two equal centroids in different splits the first wins."""
    g = torch.Generator().manual_seed(m)
    whitener = torch.randn(h, d, d, generator=g) / d**0.5 + torch.eye(d)
    centroids = torch.randn(h, m, d, generator=g)
    centroids[:, m - 100] = centroids[:, 100]
    keys = torch.randn(b, h, 1, d, generator=g)
    keys[0, :, 0] = (centroids[:, 100, None] @ torch.linalg.inv(whitener))[:, 0]  # whitens onto the tied pair
    keys = keys.to(dtype)
    norms = centroids.pow(2).sum(-1)[:, None, :]
    rotation = random_rotation(g, b, 1, d)
    rotation[0][0], rotation[1][0] = 1.0, 0.0  # row 0 unturned, so its keys stay on the pair
    expected = reference.encode_keys(keys, rotation, whitener, centroids, norms,
                                     torch.zeros(b, h, 1, dtype=torch.uint16))
    got = triton_codes.encode_keys(to(keys), tuple(map(to, rotation)), to(whitener), to(centroids), to(norms),
                                   to(torch.zeros(b, h, 1, dtype=torch.uint16)))
    assert_nearest(got, expected, keys.float(), rotation, whitener, centroids)
    assert (got[0, :, 0] == 100).all(), "the first of equal centroids must win"


@pytest.mark.parametrize(
    "b, hq, hkv, d, m, rot, turns",
    [(2, 9, 3, 64, 257, 64, 1), (1, 12, 1, 80, 40, 80, 1), (3, 4, 4, 24, 1000, 16, 1), (2, 6, 2, 32, 16, 0, 1),
     (2, 9, 3, 64, 100, 64, 7), (1, 4, 2, 24, 33, 16, 3), (3, 8, 2, 64, 300, 64, 12), (1, 4, 2, 256, 50, 256, 2)],
    ids=["smollm2-shape", "group12-d80", "mha-partial-rotary", "no-rotation", "seven-buckets", "buckets-partial",
         "row-tiles", "d256"],
)
@pytest.mark.parametrize("summed", [False, True], ids=["per-query-head", "summed"])
def test_lookup_table_matches_reference(b, hq, hkv, d, m, rot, turns, summed):
    """One rotation (windowed RoPE) or several (the distance scorer's buckets: column r * M + m); "row-tiles" has
    144 (row, head, rotation) triples, three tiles of the kernel's tensor-core product, the last one partial; each
    query head's table, or (the per-KV-head rule's) each KV group's summed query's, summed as the kernel reads."""
    g = torch.Generator().manual_seed(m + hq)
    query = torch.randn(b, hq, d + 3, generator=g)[..., 3:].to(torch.bfloat16)  # strided, as a slice would be
    centroids = torch.randn(hkv, m, d, generator=g)
    rotation = random_rotation(g, b, turns, rot) if rot else None
    if turns > 1:  # a bucket's mean rotation is shorter than a unit one
        rotation = tuple(t * torch.rand(b, 1, turns, 1, generator=g) for t in rotation)
    expected = reference.rotated_lookup_table(query, rotation, centroids, summed=summed)
    got = triton_codes.rotated_lookup_table(to(query), rotation and tuple(map(to, rotation)), to(centroids),
                                            summed=summed)
    assert expected.shape == (b, hkv if summed else hq, turns * m)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_match_reference_on_smollm2(smollm2, austen):
    """Real keys, rotations and queries captured from SmolLM2 decoding Persuasion with its calibrated codebooks (all
    layers of two decode steps): the kernels give the reference's codes and lookup tables."""
    from a2ats_eval.assets import demo_codebooks

    model, tokenizer = smollm2
    books = demo_codebooks(model, tokenizer, austen)
    ids = tokenizer(austen["Persuasion"][50000:53000], return_tensors="pt")["input_ids"].to(DEVICE)
    calls = {"encode_keys": [], "rotated_lookup_table": []}
    originals = {name: getattr(kernels, name) for name in calls}

    def spy(name):
        def call(*args):
            calls[name].append(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
            return originals[name](*args)
        return call

    cache = A2ATSCache(books, topk=0.03)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        for name in calls:
            mp.setattr(kernels, name, spy(name))
        out = model(ids, **cache_argument(model, cache))
        for _ in range(2):
            out = model(out.logits[:, -1:].argmax(-1), **cache_argument(model, cache))
    decode = [c for c in calls["encode_keys"] if c[0].shape[2] == 1]
    assert len(decode) == len(calls["rotated_lookup_table"]) == 2 * model.config.num_hidden_layers
    for keys, rotation, whitener, centroids, norms, out, _ in decode:
        got = triton_codes.encode_keys(to(keys), tuple(map(to, rotation)), to(whitener), to(centroids), to(norms),
                                       to(torch.zeros_like(out)))
        expected = reference.encode_keys(keys, rotation, whitener, centroids, norms, out)
        assert_nearest(got, expected, keys.float(), rotation, whitener, centroids)
    for query, rotation, centroids, _, summed in calls["rotated_lookup_table"]:
        got = triton_codes.rotated_lookup_table(to(query), tuple(map(to, rotation)), to(centroids), summed=summed)
        torch.testing.assert_close(got.cpu(), reference.rotated_lookup_table(query, rotation, centroids,
                                                                             summed=summed), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("b, hkv, n, m, window, buckets", [(2, 3, 300, 7, 16, 5), (1, 2, 40, 5, 16, 2),
                                                           (3, 1, 17, 4, 16, 1)],
                         ids=["five-buckets", "one-move", "just-left-the-window"])
def test_lookup_table_moves_bucket_columns_as_reference(b, hkv, n, m, window, buckets):
    """The distance scorer's columns and histogram moved on by a token in the lookup table's launch as the reference
    moves them, with moved tokens sharing a column value (the histogram updates must not collide) and masked
    candidates; the table is the one computed without a move."""
    g = torch.Generator().manual_seed(n)
    columns = torch.randint(0, 2, (b, hkv, n + 5), generator=g, dtype=torch.int32) * m  # few values: collisions
    histogram = torch.randint(0, 50, (b, hkv, buckets * m + m), generator=g, dtype=torch.int32)
    codes = torch.randint(0, m, (b, hkv, n + 5), generator=g).to(torch.uint16)
    far = torch.rand(b, n, generator=g) > 0.3
    starts = torch.sort(torch.randperm(max(n - 2 * window, 0), generator=g)[: buckets - 1] + 2 * window).values
    query, centroids = torch.randn(b, 2 * hkv, 16, generator=g), torch.randn(hkv, m, 16, generator=g)
    rotation = random_rotation(g, b, buckets, 16)
    table = reference.rotated_lookup_table(query, rotation, centroids)

    def moved(lookup, columns, far, starts, n):
        state = [to(columns.clone()), to(histogram.clone())]  # the inputs stay as they were (to() may not copy)
        move = reference.ColumnMove(*state, to(codes), to(far), to(starts), n, m, window)
        lut = lookup(to(query), tuple(map(to, rotation)), to(centroids), move)
        torch.testing.assert_close(lut.cpu(), table, atol=1e-5, rtol=1e-5)
        return [t.cpu() for t in state]

    expected = moved(reference.rotated_lookup_table, columns, far, starts, n)
    expected_columns = columns.clone()
    reference.move_bucket_columns(expected_columns, histogram.clone(), codes, far, starts, n, m, window)
    assert torch.equal(expected[0], expected_columns)  # the reference moves as move_bucket_columns does
    got = moved(triton_codes.rotated_lookup_table, columns, far, starts, n)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # a capture-ready step: the length on the device, a wider step (columns past n hold no token, and may hold
    # anything), and buckets that start past the tokens, which move none
    later = torch.cat([starts, torch.tensor([n + 1, n + 3])])
    far_wide = torch.cat([far, torch.rand(b, 5, generator=g) > 0.3], 1)
    stale = columns.clone()
    stale[:, :, n:] = 7 * m
    for lookup in (reference.rotated_lookup_table, triton_codes.rotated_lookup_table):
        got = moved(lookup, stale, far_wide, later, to(torch.tensor([n])))
        assert torch.equal(got[0][:, :, :n], expected[0][:, :, :n]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("group, summed", [(4, 1), (1, 4)], ids=["per-query-head", "summed"])
def test_lookup_table_with_move_compiles_for_hopper(on_device, group, summed):
    """The lookup table with the columns' move in its launch compiles to PTX for sm_90 without a GPU, each query
    head's or each KV group's summed query's."""
    compile_for_hopper("triton_codes", "_lut_kernel",
                       {"HKV": 8, "G": group, "D": 128, "D_PAD": 128, "ROT": 128, "BLOCK_R": 16, "BLOCK_M": 64,
                        "PRECISION": "tf32x3", "MOVE": True, "S_PAD": 16, "N_ON_DEVICE": on_device,
                        "SUMMED": summed},
                       {"q_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "c_ptr": "*fp32", "out_ptr": "*fp32",
                        "code_ptr": "*u16", "far_ptr": "*i1", "starts_ptr": "*i64", "n_ptr": "*i64"})
