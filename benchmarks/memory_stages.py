"""B3 probe: resident memory at each stage of the baseline's WikiText-2 pass (default preset, 16 x 512).

    python benchmarks/memory_stages.py                # the engine's path: full-window logits
    python benchmarks/memory_stages.py --chunked      # the output head chunk by chunk (as past 2K tokens)

Prints ``VmRSS`` (resident now) and ``VmHWM`` (the process's peak) from ``/proc/self/status`` after each
stage, and with ``--check FILE`` whether the baseline statistics equal those another mode saved there
(bit for bit). ``VmHWM`` counts memory-mapped weight pages once a forward has touched them, as
``/usr/bin/time -v`` does. Memory needs no idle machine, but the seconds are not a benchmark.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def rss() -> str:
    d = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmRSS", "VmHWM")))
    now, peak = (int(d[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
    return f"RSS {now:6.0f} MB   peak {peak:6.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunked", action="store_true", help="logits chunk by chunk from the hidden states")
    ap.add_argument("--save", type=Path, help="save the baseline statistics here")
    ap.add_argument("--check", type=Path, help="compare the baseline statistics with those saved here")
    a = ap.parse_args()
    import torch

    print(f"{'torch imported':28s}", rss())
    from quanteval.config import ModelConfig
    from quanteval.data import data_file, resolve_data_dir
    from quanteval.evaluate import fidelity
    from quanteval.models import load_model

    loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)
    print(f"{'model loaded':28s}", rss())
    text = data_file(resolve_data_dir(None), "wikitext2/test.txt").read_text()
    windows = fidelity.make_windows(loaded.tokenizer, text, 16, 512)
    print(f"{'windows made':28s}", rss())
    if a.chunked:
        fidelity.LONG = 0
    t0, parts = time.perf_counter(), []
    with torch.no_grad():
        for i in range(0, 16, 4):
            parts.append(fidelity.baseline_stats(loaded.model, windows[i:i + 4], 64))
            print(f"{f'after {i + 4} windows':28s}", rss(), f"  {time.perf_counter() - t0:5.1f} s")
    stats = {k: torch.cat([getattr(p, k) for p in parts]) for k in vars(parts[0])}
    if a.save:
        torch.save(stats, a.save)
    if a.check:
        other = torch.load(a.check)
        print("bit-identical to", a.check, all(torch.equal(stats[k], other[k]) for k in stats))


if __name__ == "__main__":
    main()
