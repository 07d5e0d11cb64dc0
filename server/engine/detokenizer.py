"""Incremental detokenization with stop strings.

Text is released only when complete: a token that ends inside a multi-byte character
decodes to U+FFFD and is held back until the character is whole, and text that could be
the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], context_ids: list[int]) -> None:
        """`context_ids`: the prompt's last few tokens, decoded with the first new ones so
        tokenizers that merge across the boundary (leading spaces) come out right."""
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = list(context_ids)
        self.prefix_offset = 0  # tokens[prefix_offset:read_offset] were decoded already
        self.read_offset = len(self.tokens)
        self.text = ""  # all complete text so far
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; return the text newly safe to emit (maybe empty)."""
        self.tokens.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
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
