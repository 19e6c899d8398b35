"""`selfdistill-report`: compare reward arms with their matched twins (DESIGN.md).

Not implemented yet: until it is, each run's `summary.json` and `metrics.jsonl` (held-out accuracy
per domain and difficulty band under `heldout/...`) are the numbers to compare.
"""

from __future__ import annotations


def main() -> None:
    raise NotImplementedError(
        "selfdistill-report is not implemented yet; compare the runs' summary.json / metrics.jsonl "
        "(heldout/accuracy, heldout/domain/*, heldout/band/*) directly")


if __name__ == "__main__":
    main()
