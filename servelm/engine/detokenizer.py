"""Incremental detokenization with stop strings, for streaming one request's output.

Decoding the whole sequence every step is quadratic and decoding one token alone is wrong
(byte-level tokens may hold part of a UTF-8 character; SentencePiece drops the leading space
of the first token it decodes). So each step decodes a short window twice: the tokens
already emitted as text (``prefix``) and the same plus the new tokens, and emits the
difference. The window only moves forward once the text is complete, i.e. it does not end
in U+FFFD, which the decoder writes for an unfinished multi-byte character.
"""

from __future__ import annotations

from typing import Any

from servelm.sampling_params import SamplingParams

# Prompt tokens kept as decoding context for the first output token (leading spaces, etc.).
PROMPT_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns sampled token ids into output text, stop-string matches and stream deltas."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.stop: list[str] = list(params.stop or [])
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # Window state: ids[_prefix:_read] are already text; ids[_read:] are pending.
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text: str | None = None  # cache of decode(ids[_prefix:_read])
        self.output_token_ids: list[int] = []
        self.output_text = ""
        self.finished = False
        self._sent = 0  # chars of output_text already handed out by get_delta()

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:  # skip_tokenizer_init: outputs are token ids only
            return ""
        # Cleanup of tokenization spaces is not prefix-stable, so it must stay off here.
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _new_text(self, final: bool) -> str:
        """Text the pending tokens add; '' while they end in an unfinished character."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if not final and (len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT)):
            return ""
        delta = full[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = None
        # Drop the consumed head so the id list (and the decode window) stays short.
        if self._prefix > 0:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string that ended the output, if one matched.

        Tokens are consumed one at a time so a stop string ends the output at the token that
        completed it; tokens after that one are ignored (not added to output_token_ids).
        """
        for token_id in new_token_ids:
            if self.finished:
                break
            self.output_token_ids.append(token_id)
            self._ids.append(token_id)
            delta = self._new_text(final=False)
            if delta:
                stop = self._append(delta)
                if stop is not None:
                    return stop
        return None

    def _append(self, delta: str) -> str | None:
        """Add text and look for stop strings where a new match could be."""
        start = max(0, len(self.output_text) - self._max_stop_len + 1)
        self.output_text += delta
        if not self.stop:
            return None
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.output_text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        end = idx + len(s) if self.params.include_stop_str_in_output else idx
        self.output_text = self.output_text[:end]
        self.finished = True
        return s

    def _held_back(self) -> int:
        """Length of the longest tail of output_text that could begin a stop string."""
        if self.finished or not self.stop:
            return 0
        text = self.output_text
        for n in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    @property
    def sent_chars(self) -> int:
        """Characters of output text handed out by get_delta() so far."""
        return self._sent

    def resume(self, output_token_ids: list[int], sent_chars: int) -> None:
        """Go on with a request moved from another engine: its output so far, of which
        `sent_chars` characters were handed out there."""
        self.update(output_token_ids)
        self._sent = sent_chars

    def get_delta(self) -> str:
        """Text that is safe to stream since the previous call (never a partial stop)."""
        end = max(self._sent, len(self.output_text) - self._held_back())
        delta = self.output_text[self._sent : end]
        self._sent = end
        return delta

    def flush(self) -> str:
        """Finish: decode any pending tokens as they are, release held text, return the rest.

        Pending bytes of an unfinished character come out as U+FFFD, exactly as
        ``tokenizer.decode`` of the whole output would write them.
        """
        if not self.finished and self._read < len(self._ids):
            delta = self._new_text(final=True)
            if delta:
                self._append(delta)
        self.finished = True
        return self.get_delta()
