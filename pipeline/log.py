"""One logger for the package; ranks other than 0 only log warnings, so output is read once."""

import logging
import os
import sys

LOG = logging.getLogger("arpipe")


def setup_logging(rank: int | None = None) -> None:
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if LOG.handlers:
        LOG.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        return
    handler = logging.StreamHandler(sys.stderr)
    tag = f"[arpipe rank {rank}]" if os.environ.get("WORLD_SIZE", "1") != "1" else "[arpipe]"
    handler.setFormatter(logging.Formatter(f"%(asctime)s {tag} %(message)s", "%H:%M:%S"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    LOG.propagate = False
