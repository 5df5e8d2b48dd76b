"""`python -m agent` is the same as the `seyaha-agent` command."""

from agent.cli import main

raise SystemExit(main())
