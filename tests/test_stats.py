"""AttendedStats: device and host counts add up without the host waiting on them."""

from __future__ import annotations

import torch

from a2ats_hf.stats import AttendedStats


def test_stats_add_without_aliasing_what_they_are_given():
    """Two passes of three layers: the pass's one totals tensor counts for every layer (added once, by the first),
    host counts and device counts [B, Hkv] add up, and neither tensor given is modified."""
    stats = AttendedStats()
    per_head, counts = torch.tensor([10, 2, 12]), torch.tensor([[1, 2], [0, 4]], dtype=torch.int32)
    for _ in range(2):
        for layer in range(3):
            stats.add(counts if layer else 5, per_head, heads=2, first=layer == 0)
    assert per_head.tolist() == [10, 2, 12] and counts.tolist() == [[1, 2], [0, 4]]
    assert stats.steps == 2 and stats.far_selected == 2 * (5 + 2 * 7)
    assert (stats.far_tokens, stats.attended, stats.past_tokens) == (120, 38 + 24, 144)
