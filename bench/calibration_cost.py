"""Codebook construction at Llama-3.1-8B's scale on one GPU: 32 layers x 8 KV heads, head dim 128, 4096 centroids,
80K calibration tokens per head, on a random-weight model (the cost does not depend on the weights). Reports wall
time (forward passes and k-means), peak GPU memory, k-means iterations and the final objective, against the goal of
under 5 minutes and 20 GB.

    python -m bench.calibration_cost      (GPU; writes bench/results/calibration-cost/<date>-<commit>-<gpu>.json)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import a2ats_hf  # noqa: F401  (registers the recording attention)
from a2ats_hf import calibrate
from bench.common import WordTokenizer, build, environment, results_path, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=80 * 1024, help="calibration tokens (text + UUID)")
    parser.add_argument("--n-centroids", type=int, default=4096)
    parser.add_argument("--kmeans-iters", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=8192, help="tokens per calibration forward pass")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = build([0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated()
    started = time.perf_counter()
    books = calibrate(model, WordTokenizer(), texts(), n_centroids=args.n_centroids, max_tokens=args.tokens * 4 // 5,
                      uuid_tokens=args.tokens // 5, kmeans_iters=args.kmeans_iters, chunk_size=args.chunk_size,
                      progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated()
    result = {"environment": environment(), "layers_x_kv_heads": list(books.whitener.shape[:2]),
              "tokens": args.tokens, "n_centroids": args.n_centroids, "chunk_size": args.chunk_size,
              "seconds": round(seconds, 1),
              "peak_gpu_gib": round(peak / 2**30, 1),
              "peak_gpu_gib_without_weights": round((peak - weights) / 2**30, 1),
              "kmeans_iterations": books.calibration["kmeans_iterations"],
              "kmeans_objective": books.calibration["kmeans_objective"]}
    out = args.out or results_path("calibration-cost")
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
