"""agent/collector.py: the collector set up once per process (each case in a process of its
own: freezing is for the whole interpreter)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


def test_what_lives_at_settling_is_frozen_and_later_cycles_are_still_collected() -> None:
    out = _run(
        """
        import gc, weakref
        from agent.collector import settle

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.other, b.other = b, a
            return weakref.ref(a)

        garbage_before = cycle()  # a cycle already garbage when settle runs
        settle()
        frozen = gc.get_freeze_count()
        print(frozen > 1000, garbage_before() is None)
        later = cycle()
        gc.collect()
        print(later() is None)
        settle()  # once per process: nothing more is frozen
        print(gc.get_freeze_count() == frozen)
        """
    )
    assert out.split() == ["True", "True", "True", "True"]
