"""Communication: the MPI wrapper (with a one-process stand-in) and bounded exchanges."""
from .rounds import exchange_streams
from .wrapper import Comm, as_comm, world_comm

__all__ = ["Comm", "as_comm", "exchange_streams", "world_comm"]
