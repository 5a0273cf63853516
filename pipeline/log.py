"""One logger for the package; ranks other than 0 only log warnings, so output is read once."""

import logging
import os
import sys

LOG = logging.getLogger("arpipe")


def setup_logging(rank: int | None = None) -> None:
    """(Re)configure for this process; call again once the rank is known."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if not LOG.handlers:
        LOG.addHandler(logging.StreamHandler(sys.stderr))
        LOG.propagate = False
    tag = f"[arpipe rank {rank}]" if os.environ.get("WORLD_SIZE", "1") != "1" else "[arpipe]"
    LOG.handlers[0].setFormatter(logging.Formatter(f"%(asctime)s {tag} %(message)s", "%H:%M:%S"))
    LOG.setLevel(logging.INFO if rank == 0 else logging.WARNING)
