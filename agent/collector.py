"""The interpreter's cyclic garbage collector, set up for a process that runs an agent.

What a process holds once its agent is open (modules, the configuration, engines, compiled
statements) lives as long as the process. Left to the collector, every full collection
goes through all of it again: two of them fell inside each full pass of a 1M-slot
inventory, 40-60 ms each (about 0.12 s of a 1.1 s pass, counted with gc.callbacks).
`settle` collects what is already garbage and then moves everything still alive out of
the collector's reach (gc.freeze): later collections go through what was made since only.
Reference counting still frees those objects; only a cycle among them, if one ever became
garbage, would stay (nothing made before then is, since it was just collected). One does:
the first agent's own cycles, once a configuration reload closes it (about 2,700 objects,
counted with gc.unfreeze() and gc.collect() after closing an agent), once per process, since
later agents are not frozen.
"""

from __future__ import annotations

import gc
import threading

_settled = threading.Event()


def settle() -> None:
    """Call once the agent is open, before its first pass (the CLI and the daemon do). Once
    per process: later calls (an agent started again by a reload) do nothing, so that what
    the agent before held is never frozen."""
    if _settled.is_set():
        return
    _settled.set()
    gc.collect()
    gc.freeze()
