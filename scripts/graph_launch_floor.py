"""What one near-empty kernel costs in the graph timer's arithmetic, on this GPU.

The graph timer (docs/methodology.md) captures k ops into a CUDA graph, replays it between two
events and divides by k. This does the same with torch for a kernel that reads and writes one
float (`x.add_(1)` on a one-element tensor), and for chains of 2 and 3 such kernels per "op", so
the per-kernel cost of back-to-back dependent launches in a graph can be set beside a decode op's
figure: whatever an op costs above it is the op's own work and its extra launches.

    python3 scripts/graph_launch_floor.py            # needs torch with CUDA and a GPU

Prints one line per chain length: the median of 21 samples (each a replay of k = 1000 ops) and
the spread of the middle half, µs per op.
"""

from __future__ import annotations

import statistics
import sys


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("graph_launch_floor: no CUDA device", file=sys.stderr)
        return 2
    x = torch.zeros(1, device="cuda")
    stream = torch.cuda.Stream()
    k, samples = 1000, 21
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, k={k}")
    for chain in (1, 2, 3):
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm the kernel outside the capture
                x.add_(1)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(k * chain):
                    x.add_(1)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(samples + 2):
                start.record(stream)
                graph.replay()
                end.record(stream)
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / k)
        times = sorted(times[2:])  # the first two replays warm the graph
        q1, q3 = times[len(times) // 4], times[3 * len(times) // 4]
        median = statistics.median(times)
        print(f"{chain} kernel(s) per op: median {median:.2f} us per op "
              f"(middle half {q1:.2f}-{q3:.2f}), {median / chain:.2f} us per kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
