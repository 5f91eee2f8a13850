"""What the bench scripts that time token steps in interleaved rounds share: their arguments, the
rounds under a chosen load (``rwkv2rknn.tools.bench.interleave``, busy loops beside, the load
average printed before and after) and the table of medians."""

import argparse
import statistics
from typing import Callable, Dict, List, Optional

from rwkv2rknn.tools.bench import interleave
from rwkv2rknn.tools.busy import BusyLoops, describe_load, load_average
from rwkv2rknn.tools.timing import time_steps


def parser(description: str, rounds: int) -> argparse.ArgumentParser:
    """ART, --busy, --rounds, --per-round."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("artifact")
    ap.add_argument("--busy", type=int, default=0, help="single-core busy loops beside the rounds")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--per-round", type=int, default=3, help="tokens each way steps in a round")
    return ap


def token_ids(vocab: int, a) -> List[int]:
    """2 warm-up tokens, then --per-round for each of --rounds (seeded)."""
    import numpy as np

    return [int(t) for t in np.random.default_rng(0).integers(0, vocab, 2 + a.rounds * a.per_round)]


def timed_rounds(
    steps: Dict[str, Callable[[int], object]],
    ids: List[int],
    a,
    runs: Optional[Dict[str, Callable[[List[int]], List[float]]]] = None,
    clocks: Optional[Dict[str, Callable[[], float]]] = None,
    cpu: Optional[Dict[str, List[float]]] = None,
) -> Dict[str, List[float]]:
    """ms per token of each step function (one token a call), in --rounds interleaved rounds
    with --busy busy loops beside them; ``runs``: more runners that time a list of tokens
    themselves; ``clocks`` / ``cpu``: CPU seconds per runner and the CPU ms per token it spent
    (rwkv2rknn.tools.bench.interleave)."""
    runs = {
        **{k: (lambda tokens, f=f: time_steps(f, tokens, warmup=0)) for k, f in steps.items()},
        **(runs or {}),
    }
    print(f"load average at the start: {describe_load(load_average())}; busy loops: {a.busy}")
    with BusyLoops(a.busy):
        times = interleave(runs, ids, a.rounds, clocks, cpu)
        print(f"load average at the end: {describe_load(load_average())}")
    return times


def print_medians(
    times: Dict[str, List[float]], base: str, width: int, cpu: Optional[Dict[str, List[float]]] = None
) -> None:
    """One line a way: median ms per token, its ratio to ``base``'s, min and max; with ``cpu``
    its CPU ms per token (median) and the cores it held while it ran."""
    ref = statistics.median(times[base])
    for k, v in times.items():
        med = statistics.median(v)
        line = f"{k:<{width}} {med:8.1f} ms/token  {med / ref:5.2f}x  (min {min(v):.1f}, max {max(v):.1f})"
        if cpu and cpu.get(k):
            line += f"  CPU {statistics.median(cpu[k]):6.1f} ms/token, {sum(cpu[k]) / sum(v):4.2f} cores"
        print(line)
