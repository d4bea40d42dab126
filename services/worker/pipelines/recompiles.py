"""Counting and logging torch.compile's compiles: each one after warm-up is a recompile on a user's time.

Dynamo calls its compile-start callbacks (`torch._dynamo.callback.callback_handler`) once per frame it compiles.
During warm-up those are the expected compiles of the served grid; after it, each is logged as a recompile with its
cause (the latent size and padded batch of the call in flight; run with `TORCH_LOGS=recompiles` for the guard that
failed). Past dynamo's recompile limit a function silently runs eagerly, so the worker raises that limit to the
grid's size and counts here what it would otherwise never see.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class RecompileWatch:
    """Counts dynamo compiles (all, and those after warm-up); register with `install()`, remove with `close()`."""

    def __init__(self) -> None:
        self.compiles = 0
        self.recompiles = 0
        self.warming = True
        self._lock = threading.Lock()
        self._calls = threading.local()
        self._callback: Any = None

    def install(self) -> bool:
        """Register the callback with dynamo; False (and a log line) where this torch has no callback handler."""
        try:
            from torch._dynamo.callback import CallbackTrigger, callback_handler
        except ImportError:
            log.warning("this torch has no dynamo compile callbacks: recompiles are not counted")
            return False

        def on_start(args: Any) -> None:
            if getattr(args, "callback_trigger", CallbackTrigger.DYNAMO) == CallbackTrigger.DYNAMO:
                self.on_compile(str(getattr(args, "compile_id", "?")))

        self._callback = callback_handler.register_start_callback(on_start)
        return True

    def close(self) -> None:
        if self._callback is not None:
            from torch._dynamo.callback import callback_handler

            with contextlib.suppress(ValueError):  # torch._dynamo.reset() clears the callbacks
                callback_handler.remove_start_callback(self._callback)
            self._callback = None

    def calling(self, description: str | None) -> None:
        """What the compiled UNet is being called with in this thread (the cause logged if that call compiles);
        None after the call. Compiles outside such a call (other compiled code) are not counted."""
        self._calls.current = description

    @property
    def _call(self) -> str | None:
        return getattr(self._calls, "current", None)

    def on_compile(self, compile_id: str) -> None:
        if self._call is None:
            return
        with self._lock:
            self.compiles += 1
            if self.warming:
                log.info("compiling (warm-up) %s: compile %s", self._call, compile_id)
                return
            self.recompiles += 1
            count = self.recompiles
        log.warning("RECOMPILE #%d on a request's time (compile %s), caused by a call with %s; set "
                    "TORCH_LOGS=recompiles for the failed guard", count, compile_id, self._call)
