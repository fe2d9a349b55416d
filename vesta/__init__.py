"""Vesta: a federated compute daemon for small, trusted groups of personal machines.

From Python: ``vesta.Client`` (blocking), ``vesta.AsyncClient`` (asyncio) and ``vesta.Executor`` (a
``concurrent.futures.Executor`` for commands); see ``vesta.client``. They are imported on first use, so
``import vesta`` stays cheap for the command-line tools.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "Executor", "JobResult", "__version__", "as_completed", "wait"]

if TYPE_CHECKING:
    from vesta.client import AsyncClient, Client, Executor, JobResult, as_completed, wait


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        from vesta import client

        return getattr(client, name)
    raise AttributeError(f"module 'vesta' has no attribute {name!r}")
