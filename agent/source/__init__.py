"""Reading the supplier's inventory database."""

from agent.source.reader import Snapshot, SourceReader

__all__ = ["Snapshot", "SourceReader"]
