"""Everything that touches the world; `Kernel` is the embedding facade."""

from adapters.bootstrap import Kernel

__all__ = ["Kernel"]
