"""`selfdistill.train` under torchrun that dies once: on the first attempt
(TORCHELASTIC_RESTART_COUNT=0) rank 0 exits with status 1 as soon as the checkpoint named by
CRASH_AFTER is complete, so `torchrun --max-restarts 1` restarts the job. Used by tests/test_engines.py.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _crash_when_checkpointed(name: str) -> None:
    while not glob.glob(os.path.join("outputs", "*", "*", "checkpoints", name, "COMPLETE")):
        time.sleep(0.02)
    os._exit(1)


if __name__ == "__main__":
    if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "0":
        threading.Thread(target=_crash_when_checkpointed, args=(os.environ["CRASH_AFTER"],), daemon=True).start()
    from selfdistill.train import main

    main()
