"""What the engine reports about itself while it runs: cumulative counters, a periodic stats line
(vLLM's shape) and one warning per burst of preemptions."""

import logging
import time
from dataclasses import dataclass

logger = logging.getLogger("moeserve.stats")


@dataclass(frozen=True)
class EngineState:
    """The engine at one moment, as metrics read it."""

    running: int  # sequences being generated
    waiting: int  # sequences waiting to be scheduled
    kv_cache_usage: float  # fraction of KV cache blocks in use (1 = full)
    num_preemptions: int  # since start
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # tokens found there


@dataclass
class EngineCounters:
    prompt_tokens: int = 0  # prompt tokens computed (prefill; a preempted sequence's recompute counts again)
    generation_tokens: int = 0


class PreemptionLog:
    """A warning when preemptions start, then at most one per interval while they go on, with the count."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self.reported = 0
        self.last_report = float("-inf")

    def update(self, total: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if total > self.reported and now - self.last_report >= self.interval_s:
            logger.warning("%d sequences preempted (%d since start): the KV cache ran out of blocks, so they are "
                           "recomputed later; more KV cache (--kv-cache-memory, --gpu-memory-utilization) or a lower "
                           "--max-num-seqs avoids it", total - self.reported, total)
            self.reported, self.last_report = total, now


class StatsLogger:
    """Every interval_s while the engine works: prompt and generation throughput since the last line,
    running and waiting sequences, KV cache usage, prefix cache hit rate."""

    def __init__(self, engine, interval_s: float = 10.0):
        self.engine = engine
        self.interval_s = interval_s
        self.last_time = time.monotonic()
        self.last = EngineCounters()
        self.last_queries = self.last_hits = 0

    def maybe_log(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = now - self.last_time
        if elapsed < self.interval_s:
            return
        counters, blocks = self.engine.counters, self.engine.block_manager
        queries, hits = blocks.prefix_queries - self.last_queries, blocks.prefix_hits - self.last_hits
        logger.info("prompt throughput %.1f tokens/s, generation throughput %.1f tokens/s, running %d, waiting %d, "
                    "KV cache usage %.1f%%, prefix cache hit rate %.1f%%",
                    (counters.prompt_tokens - self.last.prompt_tokens) / elapsed,
                    (counters.generation_tokens - self.last.generation_tokens) / elapsed,
                    len(self.engine.scheduler.running), len(self.engine.scheduler.waiting), 100 * blocks.usage,
                    100 * hits / queries if queries else 0.0)
        self.last_time, self.last = now, EngineCounters(counters.prompt_tokens, counters.generation_tokens)
        self.last_queries, self.last_hits = blocks.prefix_queries, blocks.prefix_hits
