"""The benchmark suite of seyaha-agent: `python -m bench all [--quick]` or `python -m bench NAME`.

Each measurement runs beside its reference (its "floor") in the same run, several times, and
reports medians and ratios. The full run regenerates docs/benchmarks.md; nothing under tests/
is involved, and no figure here is asserted anywhere: these are measurements, not tests.

Layout:
  __main__.py     the command line: which measurements, how many runs, where the report goes
  context.py      the run's shared fixtures: the PostgreSQL database, inventories, state files
  inventory.py    the partner schema, its 1M-slot COPY generator and the changes applied to it
  agentconf.py    the agent's TOML configuration for each measurement
  receiver.py     a minimal fast Seyaha stand-in, run as its own process (and its handle)
  worker.py       measured work in a fresh subprocess (scan, floors, drain, polls, HTTP floors)
  full_scan.py    1. full reconciliation vs a plain SELECT; peak RSS per size
  poll.py         2. incremental polls with 0, 100 and 10,000 changed rows
  latency.py      3. commit-to-delivery latency with wake-ups and with plain polling
  throughput.py   4. draining a 10,000-notify backlog vs bare httpx loops
  versus_dlt.py   5. the same stream of changes through dlt (dlt_loop.py runs its pipeline)
  takeover.py     6. scanning taken over after SIGKILL or SIGTERM of the scanning agent
  answers.py      7. delivery under slow and hostile answers (run on its own, not by all)
  profile.py      where the time goes: py-spy samples of a scan, a poll, a drain, the daemon
  snapshot.py     the copy of agent/ a run measures (agent/ may be edited while it runs)
  report.py       the console tables and docs/benchmarks.md
  stats.py        medians, percentiles, CPU and RSS readings

Run it from the repository root (bench is not an installed package). The full run needs the
bench extra (`pip install -e '.[bench]'`: dlt and py-spy); --quick needs neither.
"""
