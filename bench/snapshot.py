"""A frozen copy of agent/ for one run: what a run measures is one version of the agent.

agent/ may be edited while a long run goes on (and every measurement starts fresh Python
processes, which would import whatever is on disk at that moment). So a run copies agent/
into its work folder first and runs everything from there: this process imports the copy,
and every child process starts in the copy's folder (so `python -m agent` and `import agent`
find it first) with the repository after it on PYTHONPATH (for `bench` itself). The report
names the commit, whether agent/ had uncommitted changes, and whether the repository's
agent/ changed while the run went on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGEST_CHARS = 12


@dataclass(frozen=True)
class Snapshot:
    folder: Path
    digest: str
    """A hash of every file of the copied agent/."""
    commit: str
    uncommitted: bool

    def describe(self) -> str:
        text = f"commit {self.commit}"
        if self.uncommitted:
            text += f" with uncommitted changes to agent/ (content {self.digest})"
        if tree_digest(ROOT / "agent") != self.digest:
            text += (
                "; agent/ changed in the repository during the run: the run measured the "
                "copy taken at its start"
            )
        return text


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha1(usedforsecurity=False)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:DIGEST_CHARS]


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def take(folder: Path) -> Snapshot:
    """Copy agent/ into `folder` and make this process and its children use the copy."""
    if "agent" in sys.modules:
        raise RuntimeError("agent was imported before its snapshot was taken")
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    uncommitted = bool(_git("status", "--porcelain", "--", "agent"))
    shutil.copytree(ROOT / "agent", folder / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(folder))
    paths = [str(folder), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    os.chdir(folder)
    return Snapshot(folder, tree_digest(folder / "agent"), commit, uncommitted)
