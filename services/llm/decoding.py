"""Turns generated token ids into text deltas: whole UTF-8 characters only, stop sequences cut."""

from dataclasses import dataclass, field


@dataclass
class IncrementalDecoder:
    """Decodes a growing id list without re-decoding all of it, as TGI's server does.

    A token can end inside a multi-byte character; the tokenizer then yields U+FFFD and
    the text is held back until the character is complete. Text that could be the start
    of a stop sequence is held back too, so a stop sequence never reaches the caller.
    """

    tokenizer: object
    stop_sequences: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    stopped: bool = False
    _prefix_offset: int = 0
    _read_offset: int = 0

    def add(self, token_id: int) -> str:
        """Adds one token; returns the text now safe to send (maybe empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        current = decode(self.ids[self._prefix_offset :], skip_special_tokens=True)
        if len(current) > len(prefix) and not current.endswith("\ufffd"):
            self.text += current[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
        return self._release()

    def _release(self) -> str:
        for stop in self.stop_sequences:
            at = self.text.find(stop, max(0, self.sent - len(stop) + 1))
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
                return self._take(len(self.text))
        hold = 0
        for stop in self.stop_sequences:
            for size in range(min(len(stop) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        return self._take(len(self.text) - hold)

    def flush(self) -> str:
        """The held-back text once generation ends without a stop sequence."""
        return "" if self.stopped else self._take(len(self.text))

    def _take(self, upto: int) -> str:
        delta = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta
