"""Ids to text while they stream: whole UTF-8 characters out, ending before the first stop string."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def stream_text(ids: Iterable[int], tokenizer, stops: Iterable[str] = ()) -> Iterator[str]:
    """Turn a stream of ids into text pieces of whole characters, ending before the first stop string."""
    text = TextStream(tokenizer, stops)
    for token in ids:
        if piece := text.push(token):
            yield piece
        if text.stopped:
            return
    if tail := text.flush():
        yield tail


class TextStream:
    """Incremental detokenizer: ids in, text out in whole UTF-8 characters, stopping at the first stop string.

    Text that could be the start of a stop string is held back until it is clearly not one.
    """

    def __init__(self, tokenizer, stops: Iterable[str] = ()):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.pending = b""  # bytes of an incomplete UTF-8 character
        self.held = ""  # decoded text not yet released because it may begin a stop string
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that `token` releases ("" while held back); after a stop string, `stopped` is set."""
        self.pending += self.tokenizer.decode_bytes([token])
        text, self.pending = _split_utf8(self.pending)
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.held, self.pending = self.held[:cut], "", b""
            return out
        keep = max((_prefix_overlap(self.held, s) for s in self.stops), default=0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        """Everything still held at the end of the stream."""
        out = self.held + self.pending.decode("utf-8", errors="replace")
        self.held, self.pending = "", b""
        return out


def _split_utf8(data: bytes) -> tuple[str, bytes]:
    """Decode the complete characters of `data`; return them and the trailing bytes of an unfinished one."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead >> 6 == 0b10:  # a continuation byte: the character starts further back
            continue
        need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
        if need > back:
            return data[:-back].decode("utf-8", errors="replace"), data[-back:]
        break
    return data.decode("utf-8", errors="replace"), b""


def _prefix_overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
