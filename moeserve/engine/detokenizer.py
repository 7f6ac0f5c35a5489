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


class StopMatcher:
    """Finds stop strings in text that grows, looking at each new character once: one Knuth-Morris-Pratt
    automaton per stop string, whose state is the longest prefix of its stop that ends the text so far.
    Cost per step: the new characters times the number of stops, whatever the stops' lengths."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.failure = [prefix_function(stop) for stop in stops]
        self.matched = [0] * len(stops)
        self.length = 0  # characters fed so far

    def feed(self, new: str) -> tuple[int, str] | None:
        """Feed the text's new characters; the earliest stop string completed by them: (its start, it)."""
        found = None
        for i, (stop, failure) in enumerate(zip(self.stops, self.failure)):
            k = self.matched[i]
            for offset, char in enumerate(new):
                while k and stop[k] != char:
                    k = failure[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):
                    start = self.length + offset + 1 - k
                    if found is None or start < found[0]:
                        found = (start, stop)
                    k = failure[k - 1]
            self.matched[i] = k
        self.length += len(new)
        return found

    @property
    def partial_length(self) -> int:
        """How many trailing characters of the text are the beginning of some stop string."""
        return max(self.matched, default=0)


def prefix_function(pattern: str) -> list[int]:
    """failure[i]: the longest proper prefix of pattern[: i + 1] that is also its suffix."""
    failure = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = failure[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        failure[i] = k
    return failure
