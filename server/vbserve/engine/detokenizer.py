"""Incremental detokenization with stop strings.

`tokenizers`' `DecodeStream` turns tokens into text as they come: a token that ends inside
a multi-byte character yields nothing until the character is whole. On top of it, text
that could be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerFast


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerFast, stop: list[str], context_ids: list[int]) -> None:
        """`context_ids`: the prompt's last few tokens, decoded with the first new ones so
        tokenizers that merge across the boundary (leading spaces) come out right."""
        self._tokenizer = tokenizer.backend_tokenizer
        self._stream = DecodeStream(ids=_whole_characters(tokenizer, context_ids), skip_special_tokens=True)
        self.stop = stop
        self.text = ""  # all complete text so far
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; return the text newly safe to emit (maybe empty)."""
        self.text += self._stream.step(self._tokenizer, token_id) or ""
        return self._release()

    def _release(self) -> str:
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        end = len(self.text)
        if not self.stopped:
            # Hold back a tail that is a prefix of some stop string.
            for s in self.stop:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        end = max(end, self.emitted)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def flush(self) -> str:
        """At the end of generation: whatever is held back (not a stop string) is final."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


def _whole_characters(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> list[int]:
    """`ids` less the tokens of a character they end inside (a prompt given as token ids
    may end so). `DecodeStream` starts from context only when the context's text is
    complete; otherwise it would hand out the context's own text as the first new text."""
    while ids and tokenizer.decode(ids, skip_special_tokens=True).endswith("\ufffd"):
        ids = ids[:-1]
    return ids
