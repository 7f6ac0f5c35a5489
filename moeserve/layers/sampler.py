"""The sampler: one batched pass per step, each row with its own parameters, in vLLM's order:
allowed tokens -> min_tokens -> logit_bias -> repetition / frequency / presence penalties ->
temperature (0: greedy) -> min-p -> top-k -> top-p -> exponential-race draw.
Which steps run is decided from the requests' parameters on the host, never from device values. The
per-row parameter columns are copied to the device here (on a GPU the first copy waits for the
forward); the sampled ids (and the logprobs a request asked for) are read back at the end."""

from dataclasses import dataclass

import torch

from moeserve.engine.sequence import Logprob, Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]  # per row: top-N and the sampled token, when asked


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int):
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # for requests without a seed

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]) -> SamplerOutput:
        logits = logits.to(torch.float32, copy=True)  # [S, V]
        logits = self.apply_allowed_tokens(logits, seqs)
        logits = self.apply_min_tokens(logits, seqs, eos_token_ids)
        logits = self.apply_logit_bias(logits, seqs)
        logits = self.apply_penalties(logits, seqs)
        logits = self.apply_temperature_and_truncation(logits, seqs)
        token_ids = self.draw(logits, seqs).tolist()  # [S]
        return SamplerOutput(token_ids, self.gather_logprobs(logits, token_ids, seqs))

    def column(self, seqs, value, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor([value(s.params) for s in seqs], dtype=dtype, device=self.device)

    def apply_allowed_tokens(self, logits, seqs):
        rows = [i for i, s in enumerate(seqs) if s.params.allowed_token_ids is not None]
        if rows:
            disallowed = torch.ones(len(rows), self.vocab_size, dtype=torch.bool, device=self.device)
            for j, i in enumerate(rows):
                disallowed[j, seqs[i].params.allowed_token_ids] = False
            logits[rows] = logits[rows].masked_fill(disallowed, float("-inf"))
        return logits

    def apply_min_tokens(self, logits, seqs, eos_token_ids):
        rows, cols = [], []
        for i, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                stop_ids = list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else list(eos_token_ids))
                rows += [i] * len(stop_ids)
                cols += stop_ids
        if rows:
            logits[rows, cols] = float("-inf")
        return logits

    def apply_logit_bias(self, logits, seqs):
        rows, cols, biases = [], [], []
        for i, s in enumerate(seqs):
            for token, bias in s.params.logit_bias.items():
                rows.append(i), cols.append(token), biases.append(bias)
        if rows:
            index = (torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device))
            logits.index_put_(index, torch.tensor(biases, device=self.device), accumulate=True)
        return logits

    def apply_penalties(self, logits, seqs):
        if all(s.params.repetition_penalty == 1 and s.params.frequency_penalty == 0 and s.params.presence_penalty == 0
               for s in seqs):
            return logits
        counts = self.token_counts([s.output_token_ids for s in seqs])  # [S, V] in the output
        in_prompt = self.token_counts([s.prompt_token_ids for s in seqs]) > 0
        repetition = self.column(seqs, lambda p: p.repetition_penalty)[:, None]
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(in_prompt | (counts > 0), penalised, logits)
        logits -= self.column(seqs, lambda p: p.frequency_penalty)[:, None] * counts
        logits -= self.column(seqs, lambda p: p.presence_penalty)[:, None] * (counts > 0)
        return logits

    def token_counts(self, token_lists: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(t) for t in token_lists))
        padded = torch.full((len(token_lists), width), self.vocab_size, dtype=torch.long)  # pad: a column we drop
        for i, tokens in enumerate(token_lists):
            padded[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        counts = torch.zeros(len(token_lists), self.vocab_size + 1, device=self.device)
        counts.scatter_add_(1, padded.to(self.device), torch.ones(padded.shape, device=self.device))
        return counts[:, : self.vocab_size]

    def apply_temperature_and_truncation(self, logits, seqs):
        """Greedy rows keep their logits as they are (temperature 1, no truncation): argmax and logprobs
        then come from the penalised logits."""
        greedy = [s.params.greedy for s in seqs]
        temperature = self.column(seqs, lambda p: 1.0 if p.greedy else p.temperature)
        logits = logits / temperature[:, None]
        sampling = [p for p, g in zip((s.params for s in seqs), greedy) if not g]  # decided on the host: no sync
        if any(p.min_p > 0 for p in sampling):
            min_p = self.column(seqs, lambda p: 0.0 if p.greedy else p.min_p)
            probs = torch.softmax(logits, dim=-1)
            logits = logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
        def kept(p):  # tokens that top-k keeps: all unless a sampling row asks for fewer
            return min(p.top_k, self.vocab_size) if p.top_k > 0 and not p.greedy else self.vocab_size

        if any(kept(p) < self.vocab_size for p in sampling):
            logits = apply_top_k(logits, self.column(seqs, kept, torch.long))
        if any(p.top_p < 1 for p in sampling):
            logits = apply_top_p(logits, self.column(seqs, lambda p: 1.0 if p.greedy else p.top_p))
        return logits

    def draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Exponential race: argmax(p / q) with q ~ Exp(1) is an exact draw from p. A seeded request
        draws its q from its own generator, so its tokens do not depend on the rest of the batch."""
        if all(s.params.greedy for s in seqs):
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None and not s.params.greedy:
                noise[i].exponential_(generator=s.generator)
        sampled = (probs / noise).argmax(dim=-1)
        greedy = torch.tensor([s.params.greedy for s in seqs], device=self.device)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def gather_logprobs(self, logits, token_ids, seqs) -> list[dict[int, Logprob] | None]:
        """The logprobs of the rows that asked for them, from the logits the draw used."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        result: list[dict[int, Logprob] | None] = [None] * len(seqs)
        if rows:
            chosen = torch.tensor([token_ids[i] for i in rows], device=self.device)
            top = [seqs[i].params.logprobs for i in rows]
            for row, entry in zip(rows, token_logprobs(torch.log_softmax(logits[rows], dim=-1), chosen, top)):
                result[row] = entry
        return result


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    kth_largest = logits.sort(dim=-1, descending=True).values.gather(1, (top_k - 1)[:, None])
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    ascending, order = logits.sort(dim=-1)
    cumulative = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p[:, None]
    drop[:, -1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int]) -> list[dict[int, Logprob]]:
    """Per row: the chosen token's logprob and rank, and the top num_top[row] tokens'."""
    chosen_logprob = logprobs.gather(1, chosen[:, None])  # [n, 1]
    ranks = ((logprobs > chosen_logprob).sum(dim=-1) + 1).tolist()
    top_values, top_ids = logprobs.topk(max(max(num_top), 1), dim=-1)
    top_values, top_ids, chosen_logprob = top_values.tolist(), top_ids.tolist(), chosen_logprob[:, 0].tolist()
    chosen_ids = chosen.tolist()
    entries = []
    for row, n in enumerate(num_top):
        entry = {token: Logprob(value, rank + 1) for rank, (token, value) in
                 enumerate(zip(top_ids[row][:n], top_values[row][:n]))}
        entry[chosen_ids[row]] = Logprob(chosen_logprob[row], ranks[row])
        entries.append(entry)
    return entries
