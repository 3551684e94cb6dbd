"""The ``with`` protocol shared by the test servers that run in a background thread."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Background"]


class Background:
    """A server with :meth:`start` and :meth:`stop`; ``with`` starts and stops it."""

    def start(self) -> Self:
        """Start serving and return self."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop serving."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
