"""Why the audit worker runs no CUDA graphs before torch 2.14: a graph on one thread disturbs the default CUDA
generator that another thread's DP-SGD noise comes from.

The main thread draws noise from the default CUDA generator as Opacus does (``torch.normal`` without a generator)
while a worker thread replays a graph that draws no random numbers at all, in three scenarios:

- ``capture beside``: the worker also captures its graphs while the main thread draws. Up to torch 2.11 a capture
  flags the generator as capturing, and a draw elsewhere meanwhile raises "Offset increment outside graph capture
  encountered unexpectedly".
- ``captured before``: captured on the main thread before the draws start, as DMAuditor does; only replays run
  beside the draws. Before 2.14 every replay rewrites the generator's offset without its lock, so a draw at that
  moment can lose its increment and a later draw repeat its numbers.
- ``captured before, private state``: the same, but while capturing, the default generator holds a private clone of
  its state (``graphsafe_set_state``), so the graph is tied to that clone; a candidate to let older torch versions
  replay graphs beside training, not used by the package until measured here.

For each it counts failed draws, offset increments lost, and draws whose numbers repeat an earlier draw's; all zero
means the scenario leaves training's noise alone on this torch. Needs CUDA.

    python benchmarks/cuda_graph_rng_hazard.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

import torch

from bench_common import header, write_json
from opacus_dmaudit.reverse_process import cuda_graphs_leave_default_generator_alone

SCENARIOS = ("capture beside", "captured before", "captured before, private state")


@contextlib.contextmanager
def _private_generator_state(device: torch.device):
    """The default generator holds a clone of its state meanwhile (so a graph captured now is tied to the clone)."""
    default = torch.cuda.default_generators[device.index]
    original = default.graphsafe_get_state()
    default.graphsafe_set_state(default.clone_state())
    try:
        yield
    finally:
        default.graphsafe_set_state(original)


def _capture(a: torch.Tensor, side: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """One graph of a small RNG-free computation, captured as the reverse process captures (thread-local mode)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin(capture_error_mode="thread_local")
        torch.tanh(a @ a) + 1.0
        graph.capture_end()
    return graph


def _scenario(name: str, device: torch.device, *, captures: int, replay_seconds: float, numel: int) -> dict:
    generator = torch.cuda.default_generators[device.index]
    draw = lambda: torch.normal(0.0, 1.0, size=(numel,), device=device)  # noqa: E731 (Opacus' noise call)
    before = generator.get_offset()
    draw()
    increment = generator.get_offset() - before  # the offset one draw moves, alone
    a = torch.linspace(-1.0, 1.0, 256 * 256, device=device).view(256, 256)  # drawing it would move the generator
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        torch.tanh(a @ a) + 1.0  # warm-up: cuBLAS sets itself up outside any capture
    side.synchronize()
    graphs = []
    if name != "capture beside":
        with _private_generator_state(device) if name.endswith("private state") else contextlib.nullcontext():
            graphs = [_capture(a, side) for _ in range(captures)]
    counts = {"captures_beside": 0, "replays": 0}
    stop = threading.Event()

    def worker() -> None:
        try:
            if not graphs:
                for _ in range(captures):
                    graphs.append(_capture(a, side))
                    counts["captures_beside"] += 1
            ends = time.perf_counter() + replay_seconds
            with torch.cuda.stream(side):
                while time.perf_counter() < ends:
                    graphs[-1].replay()
                    counts["replays"] += 1
            side.synchronize()
        finally:
            stop.set()

    start = generator.get_offset()
    heads, failed, errors = [], 0, set()
    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    while not stop.is_set():
        try:
            heads.append(tuple(draw()[:8].tolist()))
        except RuntimeError as exc:
            failed += 1
            errors.add(str(exc).splitlines()[0][:160])
    thread.join()
    lost = (start + increment * len(heads) - generator.get_offset()) // increment
    return {"scenario": name, "draws": len(heads), "failed_draws": failed, "lost_increments": int(lost),
            "repeated_draws": len(heads) - len(set(heads)), "draw_errors": sorted(errors), **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", type=int, default=50)
    parser.add_argument("--replay-seconds", type=float, default=2.0)
    parser.add_argument("--numel", type=int, default=4096, help="elements per noise draw")
    parser.add_argument("--scenarios", nargs="*", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_graph_rng_hazard.py needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    result = {**header(device), "leaves_generator_alone": cuda_graphs_leave_default_generator_alone(), "rows": []}
    print(f"torch {torch.__version__}, {result['device']}: noise draws on the main thread beside RNG-free CUDA graphs "
          "on another", flush=True)
    for name in args.scenarios:
        row = _scenario(name, device, captures=args.captures, replay_seconds=args.replay_seconds, numel=args.numel)
        result["rows"].append(row)
        write_json(args.json, result)  # after each scenario: a run cut short keeps what it finished
        print(f"  {name:<32} {row['draws']:>7} draws beside {row['captures_beside']} captures and {row['replays']} "
              f"replays: {row['failed_draws']} failed, {row['lost_increments']} increments lost, "
              f"{row['repeated_draws']} repeated", flush=True)
        for error in row["draw_errors"]:
            print("      error:", error)


if __name__ == "__main__":
    main()
