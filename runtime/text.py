"""A row's generated text as it grows, for streaming: what is safe to send after each token.

Shared by ``Runtime.stream`` (runtime/api.py) and the server's engine (serve/engine.py).
"""

from __future__ import annotations


class TextTracker:
    """A row's text as it grows: after each token the new piece that is safe to stream (an
    incomplete UTF-8 character, decoded as U+FFFD, and a tail that may begin a stop string are
    held back) and whether a stop string appeared (the text is cut before it, as OpenAI does)."""

    def __init__(self, decode, stops: tuple[str, ...] = (), incremental: bool = True):
        self.decode, self.stops = decode, tuple(stops)
        self.incremental = incremental or bool(self.stops)
        self.ids: list[int] = []
        self.emitted = ""

    def _held(self, text: str) -> int:
        longest = max((len(s) for s in self.stops), default=0)
        for k in range(min(longest - 1, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0

    def _stop_at(self, text: str) -> int:
        return min((i for s in self.stops if (i := text.find(s)) >= 0), default=-1)

    def _release(self, text: str) -> tuple[str, bool]:
        """Everything not sent yet of ``text`` (cut before a stop string) -> (piece, stopped)."""
        cut = self._stop_at(text)
        stopped = cut >= 0
        if stopped:
            text = text[:cut]
        piece = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece, stopped

    def flush(self) -> str:
        """Release what is held back (the row ends without a new token: a response stopped by a
        probe) -> the rest of the text, with stop strings applied."""
        if not self.ids:
            return ""
        return self._release(self.decode(self.ids))[0]

    def add(self, token: int, final: bool) -> tuple[str, bool]:
        """-> (new text, stopped). With ``final`` (or a stop) everything left is released."""
        self.ids.append(token)
        if not self.incremental and not final:
            return "", False
        text = self.decode(self.ids)
        if final or self._stop_at(text) >= 0:
            return self._release(text)
        if text.endswith("\ufffd"):
            return "", False
        safe = text[: len(text) - self._held(text)]
        if not safe.startswith(self.emitted):  # a later token changed earlier text: wait
            return "", False
        piece, self.emitted = safe[len(self.emitted) :], safe
        return piece, False
