"""Training engines behind one small interface (see `base.Engine`)."""

from selfdistill.engine.base import Engine, NonFiniteError, build_engine

__all__ = ["Engine", "NonFiniteError", "build_engine"]
