"""`KVStore`: the full post-RoPE K/V of one layer in CPU memory, grown in fixed blocks (never re-copied)."""

from __future__ import annotations

import torch


class KVStore:
    """Keys and values [B, H, N, D] kept as a list of [B, H, block_size, D] blocks on the CPU.

    Appending fills the last block and adds new ones as needed, so what is stored is never copied again.
    Blocks are pinned when CUDA is available, ready for asynchronous transfers.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, block_size: int = 4096):
        self.shape = (batch, heads, block_size, head_dim)
        self.dtype = dtype
        self.block_size = block_size
        self.pin = torch.cuda.is_available()
        self.key_blocks: list[torch.Tensor] = []
        self.value_blocks: list[torch.Tensor] = []
        self.length = 0

    def _new_block(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pin)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append [B, H, T, D] keys and values (from any device)."""
        t, done = keys.shape[-2], 0
        while done < t:
            offset = self.length % self.block_size
            if offset == 0:
                self.key_blocks.append(self._new_block())
                self.value_blocks.append(self._new_block())
            n = min(t - done, self.block_size - offset)
            self.key_blocks[-1][:, :, offset : offset + n].copy_(keys[:, :, done : done + n])
            self.value_blocks[-1][:, :, offset : offset + n].copy_(values[:, :, done : done + n])
            done += n
            self.length += n

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``indices`` [B, H, K] (CPU, long, each < length) of every (row, head) -> keys, values [B, H, K, D]."""
        b, h, k = indices.shape
        keys = torch.empty(b, h, k, self.shape[-1], dtype=self.dtype)
        values = torch.empty_like(keys)
        block, offset = indices // self.block_size, indices % self.block_size
        rows = torch.arange(b)[:, None, None].expand_as(indices)
        heads = torch.arange(h)[None, :, None].expand_as(indices)
        for j in torch.unique(block).tolist():
            sel = block == j
            keys[sel] = self.key_blocks[j][rows[sel], heads[sel], offset[sel]]
            values[sel] = self.value_blocks[j][rows[sel], heads[sel], offset[sel]]
        return keys, values

    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored keys and values as two contiguous [B, H, N, D] tensors (a copy)."""
        keys = torch.cat(self.key_blocks, dim=2)[:, :, : self.length]
        values = torch.cat(self.value_blocks, dim=2)[:, :, : self.length]
        return keys, values

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.key_blocks + self.value_blocks)
