"""Communication: the MPI wrapper (with a one-process stand-in) and bounded exchanges."""
from .wrapper import Comm, as_comm, world_comm

__all__ = ["Comm", "as_comm", "exchange_streams", "world_comm"]


def __getattr__(name: str):
    # the exchange needs numpy; split and merge import this package without it
    if name == "exchange_streams":
        from .exchange import exchange_streams
        return exchange_streams
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
