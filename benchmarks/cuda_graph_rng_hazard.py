"""Why the audit worker runs no CUDA graphs before torch 2.14: a graph on one thread disturbs the default CUDA
generator that another thread's DP-SGD noise comes from.

The main thread draws noise from the default CUDA generator as Opacus does (``torch.normal`` without a generator),
while a worker thread first captures, then replays, graphs that draw no random numbers at all. It counts the draws
that failed (up to torch 2.11 a capture flags the generator, and a draw elsewhere meanwhile raises "Offset increment
outside graph capture encountered unexpectedly"), the offset increments lost (a replay rewrites the generator's
offset without its lock), and draws whose numbers repeat an earlier draw's. All zero on a torch whose graphs leave
the generator alone (``cuda_graphs_leave_default_generator_alone``). Needs CUDA.

    python benchmarks/cuda_graph_rng_hazard.py --json out.json
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from bench_common import header, write_json
from opacus_dmaudit.reverse_process import cuda_graphs_leave_default_generator_alone


def _worker(device: torch.device, *, captures: int, replay_seconds: float, stop: threading.Event,
            counts: dict) -> None:
    """Capture ``captures`` small RNG-free graphs, then replay the last one for ``replay_seconds``, on a stream of
    this thread's own (as the audit worker does)."""
    a = torch.linspace(-1.0, 1.0, 256 * 256, device=device).view(256, 256)  # drawing it would move the generator
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    graph = None
    try:
        with torch.cuda.stream(side):
            torch.tanh(a @ a) + 1.0  # warm-up: cuBLAS sets itself up outside the capture
            side.synchronize()
            for _ in range(captures):
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(capture_error_mode="thread_local")  # as the reverse process captures
                torch.tanh(a @ a) + 1.0
                graph.capture_end()
                counts["captures"] += 1
            ends = time.perf_counter() + replay_seconds
            while time.perf_counter() < ends:
                graph.replay()
                counts["replays"] += 1
        side.synchronize()
    finally:
        stop.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", type=int, default=200)
    parser.add_argument("--replay-seconds", type=float, default=3.0)
    parser.add_argument("--numel", type=int, default=4096, help="elements per noise draw")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_graph_rng_hazard.py needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    generator = torch.cuda.default_generators[device.index]
    draw = lambda: torch.normal(0.0, 1.0, size=(args.numel,), device=device)  # noqa: E731 (Opacus' noise call)
    torch.manual_seed(0)
    before = generator.get_offset()
    draw()
    increment = generator.get_offset() - before  # the offset one draw moves, alone

    counts = {"captures": 0, "replays": 0}
    stop = threading.Event()
    worker = threading.Thread(target=_worker, args=(device,), daemon=True,
                              kwargs=dict(captures=args.captures, replay_seconds=args.replay_seconds, stop=stop,
                                          counts=counts))
    start = generator.get_offset()
    heads, failed, errors = [], 0, set()
    worker.start()
    while not stop.is_set():
        try:
            heads.append(tuple(draw()[:8].tolist()))
        except RuntimeError as exc:
            failed += 1
            errors.add(str(exc).splitlines()[0][:160])
    worker.join()
    lost = (start + increment * len(heads) - generator.get_offset()) // increment
    repeated = len(heads) - len(set(heads))
    result = {**header(device), "leaves_generator_alone": cuda_graphs_leave_default_generator_alone(),
              "draws": len(heads), "failed_draws": failed, "errors": sorted(errors), "lost_increments": int(lost),
              "repeated_draws": repeated, **counts}
    print(f"torch {torch.__version__}, {result['device']}: {len(heads)} noise draws beside {counts['captures']} "
          f"captures and {counts['replays']} replays of RNG-free graphs on another thread: {failed} failed, "
          f"{lost} offset increments lost, {repeated} draws repeated an earlier one")
    for error in sorted(errors):
        print("  error:", error)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
