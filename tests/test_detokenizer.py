"""Incremental detokenization (`vbserve.engine.detokenizer`) on SmolLM2's byte-level BPE:
text streamed token by token is the text decoded at once, whatever the split."""

from __future__ import annotations

import pytest

from vbserve.engine.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.smollm2

TEXTS = [
    "Hello, world! 你好，世界 🎉🎉 naïve café — ok",
    "  two spaces\n\nand\ttabs  ",
    "ÀÉÎÕÜ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧‍👦 end",
]


def stream(tokenizer, ids: list[int], context: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], str]:
    """The pieces released (feeding tokens until a stop string is seen, as the engine
    does; then the flush) and the detokenizer's whole text."""
    detok = IncrementalDetokenizer(tokenizer, list(stop), context)
    pieces = []
    for token in ids:
        pieces.append(detok.add(token))
        if detok.stopped:
            return pieces, detok.text
    return [*pieces, detok.flush()], detok.text


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_the_decoded_text_for_every_split(smollm2, text):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode(text)
    assert len(ids) < len(text.encode())  # some tokens hold part of a character
    for cut in range(len(ids)):
        output = ids[cut:]
        pieces, full = stream(tokenizer, output, context=ids[max(0, cut - 6) : cut])
        decoded = tokenizer.decode(output)
        assert "".join(pieces) == full
        if not tokenizer.decode(ids[:cut]).endswith("\ufffd"):
            assert full == decoded, cut
            assert "\ufffd" not in full  # nothing released inside a character
        else:  # the prompt ends inside a character: the output's bytes of it are its own
            assert full == decoded and full.startswith("\ufffd"), cut


def test_special_tokens_are_skipped(smollm2):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode("<|im_start|>assistant\nhi<|im_end|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert stream(tokenizer, ids, context=[])[1] == "assistant\nhi"


@pytest.mark.parametrize("stop", ["界", " naï", "🎉🎉", "— o"])
def test_a_stop_string_ends_the_text_and_no_part_of_it_is_released(smollm2, stop):
    tokenizer = smollm2.tokenizer
    text = TEXTS[0]
    pieces, full = stream(tokenizer, tokenizer.encode(text), context=[], stop=(stop, "never seen"))
    assert full == text[: text.find(stop)]
    assert "".join(pieces) == full
