"""Row-by-row JSON results for the benchmarks and the device checks (torch-free).

`JsonRows(path, header)` keeps one document `{**header, "runs": [...], <key>: [rows]}` and rewrites
it whole after every row (a temporary file renamed over the old one), so a script cut by a time
limit or a crash leaves a valid file holding every finished row; only the row in progress is lost.
Each script run appends an entry to "runs" ({"what": ..., "complete": false}), set complete by
`finish()`: a file whose last run is incomplete was cut. With `append=True` an existing file's rows
and runs are kept and the new rows added after them (e.g. the GPU session's torch.compile step
adds its rows to the kernels' files).

    out = JsonRows("bench.json", {"kernel": "policy_loss", "device": "cuda"}, what="providers=triton")
    for ...:
        out.add({"shape": ..., "ms": ...})   # on disk now
    out.finish()
"""

from __future__ import annotations

import json
import os
import time


class JsonRows:
    def __init__(self, path: str | None, header: dict, *, key: str = "rows", what: str = "", append: bool = False):
        """`path` None keeps the rows in memory only (`rows` still works)."""
        self.path, self.key = path, key
        self.doc = {**header, "runs": [], key: []}
        if append and path and os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            self.doc = {**old, **header, "runs": old.get("runs", []), key: old.get(key, [])}
        self.run = len(self.doc["runs"])  # this run's entry
        self.doc["runs"].append({"what": what, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "complete": False})
        self.save()

    @property
    def rows(self) -> list[dict]:
        return self.doc[self.key]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def update(self, **fields) -> None:
        """Set document-level fields (e.g. a final verdict) and write."""
        self.doc.update(fields)
        self.save()

    def finish(self) -> None:
        self.doc["runs"][self.run]["complete"] = True
        self.save()

    def reload(self) -> None:
        """Read the file again (another process added to it meanwhile)."""
        with open(self.path) as f:
            self.doc = json.load(f)

    def save(self) -> None:
        """Write the document now (after rows were edited in place, too)."""
        if not self.path:
            return
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1, allow_nan=True)
        os.replace(tmp, self.path)
