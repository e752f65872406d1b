"""Time value + gradient of ``feature_r_max`` by the Gram route, the covariance route and the
naive way (autograd through ``eigvalsh`` of the covariance), in one run.

    python benchmarks/bench_conditioning.py [--repeats 20] [--threads N]

Prints one row per (B, K) with the median milliseconds of each way and the speed-ups.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_immunize.conditioning import feature_r_max, r_max

SHAPES = [(64, 512), (64, 784), (64, 768), (256, 2048)]


def naive_r_max(Z: torch.Tensor) -> torch.Tensor:
    """R_max through autograd of ``eigvalsh(ZᵀZ)`` over the top min(B, K) eigenvalues."""
    sig = torch.linalg.eigvalsh(Z.T @ Z)[-min(Z.shape) :]
    d = (sig**2).mean() / 2 - sig[0] ** 2 / 2
    return 1.0 / d


def gram_route(Z):
    return feature_r_max(Z, rank=min(Z.shape))


def covariance_route(Z):
    return r_max(Z.T @ Z, rank=min(Z.shape))


def time_it(fn, Z: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):
        z = Z.clone().requires_grad_()
        start = time.perf_counter()
        fn(z).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, "
        f"median of {args.repeats} runs, value + gradient of feature_r_max"
    )
    header = f"{'B':>5} {'K':>5} | {'gram ms':>9} {'cov ms':>9} {'naive ms':>9} | "
    print(header + f"{'naive/gram':>10} {'cov/gram':>9}")
    gen = torch.Generator().manual_seed(0)
    for batch, width in SHAPES:
        Z = torch.randn(batch, width, generator=gen, dtype=torch.float64)
        gram = time_it(gram_route, Z, args.repeats)
        cov = time_it(covariance_route, Z, max(3, args.repeats // 4))
        naive = time_it(naive_r_max, Z, max(3, args.repeats // 4))
        print(
            f"{batch:>5} {width:>5} | {gram:9.2f} {cov:9.2f} {naive:9.2f} | "
            f"{naive / gram:9.1f}x {cov / gram:8.1f}x"
        )


if __name__ == "__main__":
    main()
