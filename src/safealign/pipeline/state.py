"""The state of a run folder: which stages are done under which configuration, and which items are.

``run_state.json`` records, per finished stage, a hash of its configuration (and of the stages it depends on)
and its artifact. A stage whose hash matches and whose artifact exists is done. Items inside a stage (one expert,
one fine-tune) carry a marker with the stage hash, so a killed stage's re-run keeps the items it finished.
``--from`` starts a new nonce (``run_redo.json``) that every item marker then carries, so items made before it
count as not done, also when a killed ``--from`` run is re-run without ``--from``.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..artifacts import write_json_atomic
from ..configuration import to_dict
from ..utils import sha256_text

ITEM_MARKER = "run_item.json"


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return to_dict(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


class RunState:
    """``run_state.json``, the ``--from`` nonce, item markers, and the hashes and timings of this invocation."""

    def __init__(self, out: Path):
        self.out = out
        self.state_file = out / "run_state.json"
        self.state: dict[str, Any] = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.hashes: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.redo_file = out / "run_redo.json"
        self.nonce = json.loads(self.redo_file.read_text()).get("nonce", "") if self.redo_file.is_file() else ""

    def start_redo(self, stages: tuple[str, ...]) -> None:
        """``--from``: forget the given stages (a kill during the redo must not fall back on their old records)
        and start a new nonce for their items."""
        self.nonce = uuid.uuid4().hex[:12]
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.redo_file, {"nonce": self.nonce, "stages": list(stages)})
        for name in stages:
            self.state.pop(name, None)
        write_json_atomic(self.state_file, self.state)

    def stage_hash(self, name: str, settings: Mapping[str, Any], config: Any, deps: tuple[str, ...]) -> str:
        """Hash of a stage's configuration and of the stages it depends on; remembered for its items."""
        payload = {**settings, "config": _jsonable(config), "deps": [self.hashes[d] for d in deps]}
        h = sha256_text(json.dumps(payload, sort_keys=True, default=str))[:16]
        self.hashes[name] = h
        return h

    def done(self, name: str, h: str, artifact: Path) -> bool:
        st = self.state.get(name) or {}
        return st.get("hash") == h and artifact.exists()

    def item_done(self, name: str, folder: Path) -> bool:
        """A stage's item finished under this stage hash (and after the latest ``--from``)."""
        f = folder / ITEM_MARKER
        try:
            return f.is_file() and json.loads(f.read_text()).get("stage_hash") == self.hashes[name] + self.nonce
        except (OSError, ValueError):
            return False

    def mark_item(self, name: str, folder: Path) -> None:
        write_json_atomic(folder / ITEM_MARKER, {"stage_hash": self.hashes[name] + self.nonce})

    def record(self, name: str, h: str, artifact: Path, seconds: float) -> None:
        self.timings[name] = seconds
        self.state[name] = {"hash": h, "artifact": str(artifact), "seconds": round(seconds, 1)}
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_file, self.state)
