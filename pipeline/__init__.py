"""arpipe: shard, train, evaluate and sample autoregressive models of text, audio and images."""

__version__ = "0.1.0"


class ArpipeError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 2."""
