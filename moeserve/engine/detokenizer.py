"""Incremental detokenization and stop strings.

Decoding a window of recent tokens (the last few prompt tokens for context) and emitting only what
grew means a character split across tokens is never emitted half-done (it decodes to U+FFFD until its
last byte arrives). Text that could still turn into a stop string is held back.
"""


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = max(len(prompt_token_ids) - 5, 0)
        self.read_offset = len(prompt_token_ids)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def new_text(self, token_ids: list[int]) -> str:
        """The text the tokens since the last call add; '' while a character is incomplete."""
        before = self.decode(token_ids[self.prefix_offset : self.read_offset])
        after = self.decode(token_ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return after[len(before) :]


def find_stop(text: str, new_from: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends within text[new_from:]: (its start, the string)."""
    found = None
    for stop in stops:
        start = text.find(stop, max(0, new_from - len(stop) + 1))
        if start != -1 and (found is None or start < found[0]):
            found = (start, stop)
    return found


def partial_stop_length(text: str, stops: list[str]) -> int:
    """How many trailing characters of text are the beginning of some stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
