"""Kernels behind A2ATS decode: top-K selection over codes, sparse attention over the CPU store, LSE merge.

Every kernel has a plain torch reference in :mod:`.reference`; the rest of the package calls only the names
exported here, so faster implementations slot in behind the same signatures.
"""

from .reference import attention_with_lse, merge_attention, select_topk, sparse_attention

__all__ = ["attention_with_lse", "merge_attention", "select_topk", "sparse_attention"]
