"""Expert load you can see: the tokens each MoE layer routed to each expert (from an engine, or from a
server's /metrics), the tokens per EP rank that a placement of those experts gives, and a picture of both:
a layer x expert heatmap, and the per-rank load with the contiguous placement (no balancing) beside the
placement the balancer (moeserve.distributed.eplb) computes for the same load."""

import re
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from moeserve.distributed.eplb import balance, contiguous_placement, imbalance, rank_load

EXPERT_TOKENS = "moeserve:expert_tokens_total"
RANK_IMBALANCE = "moeserve:expert_rank_imbalance"
SAMPLE = re.compile(r'^(?P<name>[^\s{]+)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class ExpertLoad:
    layers: list[int]  # the model's layer index of each row
    counts: torch.Tensor  # [layers, experts] float64: tokens routed to each logical expert

    def __post_init__(self):
        if self.counts.dim() != 2 or self.counts.shape[0] != len(self.layers) or not self.layers:
            raise ValueError(f"expert load needs [layers, experts] counts for {len(self.layers)} layers, "
                             f"got shape {tuple(self.counts.shape)}")

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]


@dataclass(frozen=True)
class RankLoads:
    """Tokens per EP rank of every layer, with the contiguous placement (before) and the balancer's (after)."""

    before: torch.Tensor  # [layers, ranks]
    after: torch.Tensor  # [layers, ranks]
    ranks: int
    redundant: int

    def imbalance(self) -> tuple[torch.Tensor, torch.Tensor]:
        return imbalance(self.before), imbalance(self.after)


def from_engine(engine) -> ExpertLoad:
    load = engine.expert_load()
    if not load:
        raise ValueError("the model has no MoE layers: there is no expert load to show")
    return ExpertLoad(sorted(load), torch.tensor([load[layer] for layer in sorted(load)], dtype=torch.float64))


def samples(text: str, name: str):
    """(labels, value) of each sample of one metric in a Prometheus text exposition."""
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and match["name"] == name:
            yield dict(LABEL.findall(match["labels"])), float(match["value"])


def served_imbalance(text: str) -> dict[int, float]:
    """The server's own max / mean tokens per EP rank, per layer, with the placement it serves."""
    return {int(labels["layer"]): value for labels, value in samples(text, RANK_IMBALANCE)}


def parse_metrics(text: str) -> ExpertLoad:
    """The moeserve:expert_tokens_total samples of a Prometheus text exposition (one model's)."""
    counts: dict[int, dict[int, float]] = {}
    models = set()
    for labels, value in samples(text, EXPERT_TOKENS):
        models.add(labels.get("model_name"))
        counts.setdefault(int(labels["layer"]), {})[int(labels["expert"])] = value
    if not counts:
        raise ValueError(f"no {EXPERT_TOKENS} samples in the metrics: is this a moeserve server of an MoE model?")
    if len(models) > 1:
        raise ValueError(f"the metrics hold several models ({sorted(map(str, models))}); expected one")
    experts = {len(row) for row in counts.values()}
    if len(experts) != 1 or any(sorted(row) != list(range(len(row))) for row in counts.values()):
        raise ValueError("the metrics do not give every MoE layer the same experts 0..E-1")
    layers, num_experts = sorted(counts), experts.pop()
    return ExpertLoad(layers, torch.tensor([[counts[layer][e] for e in range(num_experts)] for layer in layers],
                                           dtype=torch.float64))


def fetch_metrics(url: str, timeout: float = 10.0) -> str:
    target = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(f"could not read {target}: {e}; is `moeserve serve` running there?") from None


def rank_loads(load: ExpertLoad, ranks: int, redundant: int = 0) -> RankLoads:
    if ranks < 1 or load.num_experts % ranks:
        raise ValueError(f"{load.num_experts} experts cannot be split evenly over {ranks} EP ranks; "
                         f"pick --ranks dividing {load.num_experts}")
    if redundant < 0 or (load.num_experts + redundant) % ranks:
        raise ValueError(f"{load.num_experts} experts + {redundant} redundant must be a multiple of "
                         f"{ranks} ranks; pick --num-redundant-experts accordingly")
    layers = len(load.layers)
    before = rank_load(load.counts, contiguous_placement(load.num_experts, ranks, layers))
    after = rank_load(load.counts, balance(load.counts, load.num_experts + redundant, ranks))
    return RankLoads(before, after, ranks, redundant)


def report(load: ExpertLoad, loads: RankLoads) -> str:
    before, after = loads.imbalance()
    lines = [f"tokens per EP rank, max / mean, over {loads.ranks} ranks: contiguous placement vs balanced with "
             f"{loads.redundant} redundant experts",
             f"{'layer':>6} {'tokens':>12} {'hottest expert':>15} {'contiguous':>11} {'balanced':>9}"]
    for row, layer in enumerate(load.layers):
        counts = load.counts[row]
        total = float(counts.sum())
        hottest = f"{int(counts.argmax())} ({float(counts.max()) / total:.1%})" if total else "-"
        lines.append(f"{layer:>6} {int(total):>12} {hottest:>15} {float(before[row]):>11.3f} {float(after[row]):>9.3f}")
    lines.append(f"{'worst':>6} {'':>12} {'':>15} {float(before.max()):>11.3f} {float(after.max()):>9.3f}")
    return "\n".join(lines)


def plot(load: ExpertLoad, loads: RankLoads, path: str, title: str = "") -> None:
    plt = pyplot()
    figure = plt.figure(figsize=(14, 9))
    grid = figure.add_gridspec(2, 3, height_ratios=(1.1, 1), hspace=0.4, wspace=0.45)
    experts = figure.add_subplot(grid[0, :])
    heat(figure, experts, relative(load.counts), "tokens per expert / layer mean",
         "tokens each MoE layer routed to each expert", "expert", load.layers)
    before, after = relative(loads.before), relative(loads.after)
    top = max(float(before.max()), float(after.max()), 1.0)
    worst_before, worst_after = loads.imbalance()
    for column, (values, name, worst) in enumerate(((before, "contiguous placement", worst_before),
                                                    (after, f"balanced, {loads.redundant} redundant", worst_after))):
        axis = figure.add_subplot(grid[1, column])
        heat(figure, axis, values, "tokens / mean rank", f"{name}\nworst layer max/mean {float(worst.max()):.3f}",
             "EP rank", load.layers, vmax=top)
    lines = figure.add_subplot(grid[1, 2])
    lines.plot(load.layers, worst_before.tolist(), marker=".", label="contiguous")
    lines.plot(load.layers, worst_after.tolist(), marker=".", label="balanced")
    lines.axhline(1.0, color="grey", linewidth=0.8)
    lines.set(title=f"max / mean tokens per rank\n({loads.ranks} ranks)", xlabel="layer", ylabel="max / mean")
    lines.xaxis.get_major_locator().set_params(integer=True)
    lines.legend()
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def relative(values: torch.Tensor) -> torch.Tensor:
    mean = values.mean(-1, keepdim=True)
    return torch.where(mean > 0, values / mean.clamp_min(1e-30), torch.zeros_like(values))


def heat(figure, axis, values: torch.Tensor, unit: str, title: str, xlabel: str, layers: list[int], vmax=None):
    image = axis.imshow(values.numpy(), aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=vmax)
    axis.set(title=title, xlabel=xlabel, ylabel="layer")
    ticks = list(range(0, len(layers), max(1, len(layers) // 8)))
    axis.set_yticks(ticks, [str(layers[t]) for t in ticks])
    figure.colorbar(image, ax=axis, label=unit)


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("pictures need matplotlib: pip install matplotlib (or `pip install moeserve[plots]`)") from None
    return plt


def show(load: ExpertLoad, ranks: int, redundant: int, path: str | None, title: str = "") -> str:
    """The report's text, and the picture at path when one is asked for."""
    loads = rank_loads(load, ranks, redundant)
    if path:
        plot(load, loads, path, title)
    return report(load, loads)
