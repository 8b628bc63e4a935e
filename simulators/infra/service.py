"""What the simulated services share: a with-block around ``start()`` and ``stop()``
(``async with`` around ``start()`` and ``close()`` for an asyncio one), and the
``python -m`` entry that prints the port and runs until Ctrl-C or SIGTERM.

    class Thing(Service):
        port: int
        def start(self) -> None: ...
        def stop(self) -> None: ...

    return serve(Thing(...))   # in a module's main()
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self


class Service:
    """Something that starts and stops: ``with`` starts it and stops it (``port`` is
    where it listens, for :func:`serve`)."""

    port: int

    def start(self) -> object:  # what it returns is the subclass's affair
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class AsyncService:
    """The same for an asyncio service: ``async with`` starts it and closes it."""

    async def start(self) -> object:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def serve(
    service: Service,
    *,
    failed: Callable[[], str | None] = lambda: None,
) -> int:
    """Start ``service``, print its port as the first stdout line and
    run until Ctrl-C or SIGTERM (0), or until ``failed()`` says why it has died (1)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    with service:
        print(service.port, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):
                problem = failed()
                if problem is not None:
                    print(problem, file=sys.stderr)
                    return 1
    return 0
