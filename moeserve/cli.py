"""The `moeserve` command."""

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

from moeserve.engine.args import (ATTENTION_BACKENDS, DISPATCH_FORMATS, EP_BACKENDS, KV_CACHE_DTYPES, LOAD_FORMATS,
                                  OFFLINE_MAX_NUM_BATCHED_TOKENS, QUANTIZATION_FORMATS, EngineArgs)
from moeserve.version import __version__


HELP_FORMAT = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # every --help shows the defaults
BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
# vLLM's human-readable ints: a single letter, lower case 1000-based, upper case 1024-based
LETTER_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def byte_size(text: str) -> int:
    """'4GiB', '512MiB', '1.5GB', '1e9', vLLM's '4G' (GiB) and '4g' (GB) -> bytes."""
    match = re.fullmatch(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[0-9]+)?)\s*([a-z]*)\s*", text, flags=re.IGNORECASE)
    unit = match and LETTER_UNITS.get(match.group(2), BYTE_UNITS.get(match.group(2).upper()))
    if not unit:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use bytes or a number with a unit, e.g. 4GiB, "
                                         f"512MiB, 1.5GB (or vLLM's letters: 4G is 4GiB, 4g is 4GB)")
    size = float(match.group(1)) * unit
    if not math.isfinite(size):
        raise argparse.ArgumentTypeError(f"{text!r} is too large")
    return int(size)


def add_engine_arguments(parser: argparse.ArgumentParser, model_required: bool = True, offline: bool = True) -> None:
    defaults = EngineArgs(model="")
    batched_tokens = OFFLINE_MAX_NUM_BATCHED_TOKENS if offline else defaults.max_num_batched_tokens
    parser.add_argument("--model", required=model_required, default=None,
                        help="checkpoint folder or preset name (e.g. tiny-deepseek-v3)")
    parser.add_argument("--dtype", default=defaults.dtype, help="auto (the checkpoint's), float32, bfloat16, float16")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output (default: the model's max_position_embeddings)")
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs, help="sequences per step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=batched_tokens,
                        help=f"tokens per step; prefill is chunked to fit (default {batched_tokens})")
    parser.add_argument("--block-size", type=int, default=defaults.block_size,
                        help="tokens per KV cache block (default: 64 for MLA models on CUDA, else 16)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=defaults.kv_cache_dtype,
                        help="auto: the model's dtype; fp8: E4M3 with a per-layer scale (twice the tokens)")
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=defaults.attention_backend,
                        help="auto: the Triton kernels on CUDA, the torch reference elsewhere")
    parser.add_argument("--kv-cache-memory", type=byte_size, default=None,
                        help="KV cache size, e.g. 4GiB or 512MiB (CPU default 512MiB; CUDA: from --gpu-memory-utilization)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
                        help="fraction of the GPU the engine may use, KV cache included")
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                        help="do not reuse the KV cache of shared prompt prefixes")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of requests that set none")
    parser.add_argument("--quantization", choices=QUANTIZATION_FORMATS, default=None,
                        help="quantize a bf16 checkpoint's weights as they load")
    parser.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--dp", "--data-parallel-size", dest="dp", type=int, default=1,
                        help="data parallel attention groups")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size (divides tp * dp)")
    parser.add_argument("--ep-backend", choices=EP_BACKENDS, default=defaults.ep_backend,
                        help="EP transport (auto: p2p, peer-to-peer puts through symmetric memory, for CUDA ranks "
                             "within a node; all_to_all otherwise)")
    parser.add_argument("--ep-max-tokens-per-rank", type=int, default=defaults.ep_max_tokens_per_rank,
                        help="tokens a rank may dispatch in one step, which sizes the p2p buffers "
                             "(default: --max-num-batched-tokens)")
    parser.add_argument("--ep-two-batch-overlap", action="store_true",
                        help="split each eager step's batch into two micro-batches whose MoE exchanges overlap the "
                             "other's compute (p2p backend; two sets of p2p buffers)")
    parser.add_argument("--ep-comm-sms", type=int, default=defaults.ep_comm_sms,
                        help="p2p backend: its puts run on a stream of their own with at most this many SMs, "
                             "beside the model's compute (default: the compute stream, as many as there is work)")
    parser.add_argument("--ep-dispatch-format", choices=DISPATCH_FORMATS, default=defaults.ep_dispatch_format,
                        help="tokens on the wire in EP dispatch (bf16: unquantized)")
    parser.add_argument("--num-redundant-experts", type=int, default=0,
                        help="extra expert replicas per MoE layer, spread evenly over the EP ranks (EPLB)")
    parser.add_argument("--eplb-interval", type=int, default=0,
                        help="forwards between expert rebalancings from the counted load (0: off)")
    parser.add_argument("--dist-timeout", type=float, default=defaults.dist_timeout,
                        help="seconds a collective may wait before every rank gives up")
    parser.add_argument("--load-format", choices=LOAD_FORMATS, default=defaults.load_format,
                        help="dummy: random weights (benchmarks; works for the real-shape presets)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs: every step runs eagerly (graphs are used on CUDA by default)")
    parser.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None, metavar="N",
                        help="decode batch sizes captured as CUDA graphs (default: 1 2 4 8, then steps of 8 up to "
                             "--max-num-seqs); larger decode batches run eagerly")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="schedule and prepare the next step while the device runs this one "
                             "(default: on with CUDA, off on CPU; always off in lockstep with other ranks)")
    parser.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=None,
                        help="run dummy requests through prefill and decode at start, so the kernels compile "
                             "before the first request (default: on with CUDA for one engine, off on CPU)")


def add_profile_arguments(parser: argparse.ArgumentParser, steps: str) -> None:
    parser.add_argument("--profile", action="store_true",
                        help=f"torch.profiler over {steps}: GPU busy, kernels per step, top kernels (CPU ops without CUDA)")
    parser.add_argument("--profile-steps", type=positive_int, default=8, help="steps profiled")


def add_expert_load_arguments(parser: argparse.ArgumentParser, ranks_help: str) -> None:
    parser.add_argument("--expert-load", default=None, metavar="FILE.png",
                        help="draw the run's tokens per expert and per EP rank, before and after balancing")
    parser.add_argument("--expert-load-ranks", type=int, default=None, help=ranks_help)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def engine_args(args: argparse.Namespace) -> dict:
    """The EngineArgs fields (all but the model) from the flags of add_engine_arguments."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs) if f.name != "model"}


def origins(text: str) -> list[str]:
    """--allowed-origins: a JSON list (vLLM's form) or comma-separated origins."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"not a JSON list of origins: {error}") from None
        if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
            raise argparse.ArgumentTypeError("give a JSON list of strings, e.g. '[\"https://example.com\"]'")
        return value
    return [o.strip() for o in text.split(",") if o.strip()]


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("model_positional", metavar="MODEL", nargs="?", default=None,
                       help="checkpoint folder or preset name (or --model)")
    add_engine_arguments(serve, model_required=False, offline=False)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (or MOESERVE_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL)")
    serve.add_argument("--chat-template", default=None, help="a Jinja chat template file (default: the tokenizer's)")
    serve.add_argument("--max-n", type=int, default=16, help="largest n a request may ask for")
    serve.add_argument("--max-concurrent-requests", type=int, default=256, help="more in flight get 429")
    serve.add_argument("--max-request-bytes", type=byte_size, default=8 * 2**20, help="larger bodies get 413")
    serve.add_argument("--allowed-origins", type=origins, default=[],
                       help="origins allowed cross-origin requests (CORS), e.g. '[\"https://app.example\"]' or '*'")
    serve.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (and --ssl-certfile)")
    serve.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate")
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="moeserve's own log level")
    serve.add_argument("--uvicorn-log-level", default="info", choices=LOG_LEVELS, help="the HTTP server's log level")
    serve.add_argument("--disable-log-stats", action="store_true", help="no periodic stats line while serving")


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeserve", description="Serve Mixture-of-Experts language models.",
                                     **HELP_FORMAT)
    parser.add_argument("--version", action="version", version=f"moeserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete prompts", **HELP_FORMAT)
    add_engine_arguments(generate)
    generate.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    generate.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per completion")
    generate.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    generate.add_argument("--top-k", type=int, default=0, help="0: off")
    generate.add_argument("--min-p", type=float, default=0.0, help="0: off")
    generate.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    generate.add_argument("--sampling-seed", type=int, default=None, help="seed of the requests' draws")
    generate.add_argument("--n", type=int, default=1, help="completions per prompt")
    generate.set_defaults(run=run_generate)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server", **HELP_FORMAT)
    add_serve_arguments(serve)
    serve.set_defaults(run=run_serve)

    bench = commands.add_parser("bench", help="benchmarks", **HELP_FORMAT).add_subparsers(dest="benchmark", required=True)
    throughput = bench.add_parser("throughput", help="offline generation throughput", **HELP_FORMAT)
    add_engine_arguments(throughput)
    throughput.add_argument("--num-prompts", type=int, default=64, help="prompts, all submitted at once")
    throughput.add_argument("--input-len", type=int, default=128, help="random prompt tokens")
    throughput.add_argument("--output-len", type=int, default=64, help="tokens generated per prompt")
    throughput.add_argument("--compare-hf", action="store_true",
                            help="also run the same workload through transformers' generate (baseline)")
    add_profile_arguments(throughput, "a window of steps once every request decodes")
    add_expert_load_arguments(throughput, "EP ranks of the picture (default: --ep, or 8 without it)")
    throughput.set_defaults(run=run_throughput)

    latency = bench.add_parser("latency", help="one batch, step by step: prefill and decode step times",
                               **HELP_FORMAT)
    add_engine_arguments(latency)
    latency.add_argument("--batch-size", type=int, default=8, help="prompts in the batch")
    latency.add_argument("--input-len", type=int, default=32, help="random prompt tokens")
    latency.add_argument("--output-len", type=int, default=128, help="tokens generated per prompt")
    latency.add_argument("--num-iters", type=int, default=30, help="timed iterations of the batch")
    latency.add_argument("--num-iters-warmup", type=int, default=10, help="untimed iterations first")
    latency.add_argument("--temperature", type=float, default=1.0, help="0: greedy (transformers too)")
    latency.add_argument("--compare-hf", action="store_true",
                         help="also time the same batch through transformers' generate (yardstick)")
    latency.add_argument("--output-json", default=None, metavar="FILE", help="write the results as JSON")
    add_profile_arguments(latency, "steady decode steps")
    latency.set_defaults(run=run_latency)

    plan = commands.add_parser("plan", help="memory per rank of a layout before launch, and whether it fits",
                               **HELP_FORMAT)
    add_plan_arguments(plan)
    plan.set_defaults(run=run_plan)

    info = commands.add_parser("info", help="parameters and weight memory of a model, per format", **HELP_FORMAT)
    info.add_argument("--model", required=True, help="checkpoint folder or preset (real-shape presets work)")
    info.set_defaults(run=run_info)

    ep = bench.add_parser("ep", help="expert-parallel dispatch and combine on their own", **HELP_FORMAT)
    ep.add_argument("--ranks", type=int, default=2, help="EP ranks (spawned here unless under torchrun)")
    ep.add_argument("--tokens-per-rank", default="128,4096", help="comma-separated")
    ep.add_argument("--hidden", type=int, default=7168, help="hidden size")
    ep.add_argument("--topk", type=int, default=8, help="experts per token")
    ep.add_argument("--experts", type=int, default=256, help="routed experts in all")
    ep.add_argument("--format", default="bf16,fp8,nvfp4", help="comma-separated: bf16, fp8, nvfp4")
    ep.add_argument("--backend", default="all_to_all,allgather",
                    help="comma-separated: all_to_all, allgather, p2p (CUDA: peer-to-peer puts through symmetric memory, "
                         "high-throughput mode), p2p-ll (its low-latency mode, timed as CUDA-graph replays)")
    ep.add_argument("--iterations", type=int, default=20, help="timed repetitions per point")
    ep.add_argument("--comm-sms", default="none",
                    help="comma-separated SM budgets for the p2p backends' puts and gets, each point timed at each: "
                         "none (on the compute stream, every SM) or N (a stream of their own, at most N programs)")
    ep.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ep.add_argument("--dist-timeout", type=float, default=300.0, help="seconds a collective may wait")
    ep.add_argument("--virtual-ranks", default=None,
                    help="comma-separated rank counts: the peer-to-peer transport with that many EP ranks in this "
                         "one process on one device, beside a copy of the same bytes (--ranks and --backend unused)")
    ep.add_argument("--virtual-modes", default="high-throughput,low-latency",
                    help="comma-separated modes of the peer-to-peer transport under --virtual-ranks")
    ep.set_defaults(run=run_bench_ep)

    serving = bench.add_parser("serve", help="load an OpenAI-compatible server; TTFT, TPOT, ITL, throughput",
                               **HELP_FORMAT)
    serving.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server")
    serving.add_argument("--model", required=True, help="the model name the server serves")
    serving.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    serving.add_argument("--input-len", type=int, default=256, help="prompt tokens (random ids)")
    serving.add_argument("--output-len", type=int, default=64, help="max_tokens of each request")
    serving.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate (req/s); inf: all at once")
    serving.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    serving.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")
    serving.add_argument("--ignore-eos", action="store_true", help="exact output lengths (servers that accept it)")
    serving.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    serving.add_argument("--vocab-size", type=int, default=500, help="random prompt token ids are below this")
    serving.add_argument("--save-result", default=None, help="write the report as JSON")
    serving.add_argument("--plot", default=None, help="write a latency picture (PNG; needs matplotlib)")
    add_expert_load_arguments(serving, "EP ranks of the picture (default 8)")
    serving.add_argument("--expert-load-redundant", type=int, default=0,
                         help="redundant experts the picture's balanced placement may use")
    serving.set_defaults(run=run_bench_serve)

    stats = commands.add_parser("stats", help="a running server's expert load, per layer and per EP rank, "
                                "before and after balancing", **HELP_FORMAT)
    stats.add_argument("--url", default="http://127.0.0.1:8000", help="the moeserve server (its /metrics is read)")
    stats.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the load (needs matplotlib)")
    stats.add_argument("--ranks", type=int, default=8, help="EP ranks to place the experts on")
    stats.add_argument("--num-redundant-experts", type=int, default=0,
                       help="extra expert replicas the balanced placement may use")
    stats.set_defaults(run=run_stats)

    moe = bench.add_parser("moe", help="one MoE layer's experts on one GPU: kernels vs baselines", **HELP_FORMAT)
    moe.add_argument("--model", default="deepseek-v3", help="a preset or checkpoint (its expert shapes are used)")
    moe.add_argument("--local-experts", default="32", help="comma-separated, e.g. 32,256")
    moe.add_argument("--tokens", default="1,8,32,128,512,2048,8192", help="comma-separated token counts")
    moe.add_argument("--dtype", default="bf16,fp8,nvfp4", help="comma-separated: bf16, fp8, nvfp4")
    moe.add_argument("--profile", action="store_true", help="also print each point's kernels and their times")
    moe.add_argument("--tune-output", default=None,  # an existing table is updated: other shapes stay
                     help="instead of the comparison, sweep block sizes and write the table (JSON) here")
    moe.set_defaults(run=run_bench_moe)

    attention = bench.add_parser("attention", help="the paged attention kernels on one GPU, beside the card's "
                                 "read bandwidth and SDPA flash", **HELP_FORMAT)
    attention.add_argument("--shapes", default="v2-lite,v3,v3-tp8,qwen3", help="comma-separated: v2-lite, v3, "
                           "v3-tp8 (V3 with 16 heads), qwen3, mixtral")
    attention.add_argument("--batch", default="1,32,128", help="comma-separated batch sizes")
    attention.add_argument("--context", default="1024,4096,16384", help="comma-separated context lengths")
    attention.add_argument("--block-size", type=int, default=64, help="tokens per cache block")
    attention.set_defaults(run=run_bench_attention)

    quantize = commands.add_parser("quantize", help="write a quantized copy of a bf16 checkpoint", **HELP_FORMAT)
    quantize.add_argument("source", help="checkpoint folder or tiny preset")
    quantize.add_argument("destination", help="new folder to write")
    quantize.add_argument("--format", required=True, choices=QUANTIZATION_FORMATS,
                          help="fp8: DeepSeek 128x128 blocks; nvfp4: ModelOpt layout")
    quantize.set_defaults(run=run_quantize)

    args = parser.parse_args(argv)
    logging.basicConfig(level=log_level(args), format="%(levelname)s %(name)s: %(message)s")
    from moeserve.distributed.launch import RankFailure

    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, CheckpointError, SamplingParamsError: the message says what to do
        print(f"moeserve: error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:
        print(f"moeserve: a rank failed, every rank stopped. {e}", file=sys.stderr)
        return 1


def on_ranks(args: argparse.Namespace, fn) -> int:
    """Run fn(args, context) on one process, or on every rank of --tp/--dp/--ep (started here, or by torchrun)."""
    from moeserve.distributed.launch import launch, resolve_device, under_torchrun
    from moeserve.distributed.layout import ParallelLayout

    layout = ParallelLayout(args.tp, args.dp, args.ep)
    if layout.world_size == 1 and not under_torchrun():
        return fn(args, None)
    args.device = resolve_device(args.device)  # once, here: every rank then sees the same choice
    EngineArgs(model=args.model, **engine_args(args))  # a bad flag fails here, once, not in every rank's traceback
    launch(layout, args.device, args.dist_timeout, _rank_main, fn, args)
    return 0


def _rank_main(context, fn, args: argparse.Namespace) -> None:

    from moeserve.distributed.launch import device_for_rank, resolve_device

    args.device = device_for_rank(resolve_device(args.device), int(os.environ["LOCAL_RANK"]))  # torchrun skips on_ranks
    logging.basicConfig(level=log_level(args) if context.rank == 0 else logging.WARNING,
                        format=f"%(levelname)s [rank {context.rank}] %(name)s: %(message)s", force=True)
    fn(args, context)


def log_level(args: argparse.Namespace) -> int:
    return getattr(logging, getattr(args, "log_level", "info").upper())


def run_serve(args: argparse.Namespace) -> int:
    if args.model and args.model_positional and args.model != args.model_positional:
        raise ValueError(f"two models given: {args.model_positional} and --model {args.model}; give one")
    args.model = args.model or args.model_positional
    if args.model is None:
        raise ValueError("which model? `moeserve serve MODEL` or `moeserve serve --model MODEL`")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return on_ranks(args, serve_on_rank)


def serve_on_rank(args: argparse.Namespace, context) -> int:

    from moeserve.server.app import ServerConfig
    from moeserve.server.serve import ListenOptions, serve

    template = Path(args.chat_template).read_text() if args.chat_template else None
    config = ServerConfig(model_name=args.served_model_name or args.model,
                          api_key=args.api_key or os.environ.get("MOESERVE_API_KEY"), chat_template=template,
                          max_n=args.max_n, max_concurrent_requests=args.max_concurrent_requests,
                          max_request_bytes=args.max_request_bytes, model_root=args.model,
                          allowed_origins=args.allowed_origins)
    listen = ListenOptions(args.host, args.port, args.ssl_keyfile, args.ssl_certfile, args.uvicorn_log_level,
                           None if args.disable_log_stats else 10.0)
    serve(EngineArgs(model=args.model, **engine_args(args)), config, listen, context)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    return on_ranks(args, generate_on_rank)


def generate_on_rank(args: argparse.Namespace, context) -> int:
    from moeserve.llm import LLM
    from moeserve.sampling_params import SamplingParams

    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.sampling_seed,
                            max_tokens=args.max_tokens)
    llm = LLM(args.model, context=context, **engine_args(args))
    outputs = llm.generate(args.prompt, params)
    if context is None or context.rank == 0:
        for prompt, output in zip(args.prompt, outputs):
            print(f"prompt: {prompt!r}", flush=True)
            for completion in output.outputs:
                label = "completion" if len(output.outputs) == 1 else f"completion {completion.index}"
                print(f"{label}: {completion.text!r} ({completion.finish_reason})", flush=True)
    return 0


def run_throughput(args: argparse.Namespace) -> int:
    if args.profile and args.tp * args.dp * args.ep > 1:
        raise ValueError("--profile steps one engine on one device; drop --tp/--dp/--ep")
    return on_ranks(args, throughput_on_rank)


def throughput_on_rank(args: argparse.Namespace, context) -> int:
    from moeserve.bench.throughput import run_hf_baseline
    from moeserve.bench.throughput import run_throughput as measure
    from moeserve.llm import LLM

    llm = LLM(args.model, context=context, **engine_args(args))
    result = measure(llm, args.num_prompts, args.input_len, args.output_len, args.seed)
    if context is not None:
        load = run_expert_load(llm, context) if args.expert_load else None
        if context.rank == 0:
            print(f"moeserve (tp={args.tp} dp={args.dp} ep={args.ep}):", result.report(), flush=True)
            if load is not None:
                draw_expert_load(args, load, args.num_redundant_experts)
        return 0
    print("moeserve:", result.report())
    if args.expert_load:
        draw_expert_load(args, run_expert_load(llm, None), 0)
    if args.profile:
        from moeserve.bench.profile import profile_engine
        from moeserve.bench.throughput import random_prompts, throughput_params

        prompts = random_prompts(llm.engine.config.vocab_size, args.num_prompts, args.input_len, args.seed)
        steps = min(args.profile_steps, max(1, args.output_len - 1))
        profiled = profile_engine(llm.engine, prompts, throughput_params(args.output_len, args.seed), steps, 0)
        print(profiled.report(f"steps of {args.num_prompts} prompts"))
    if args.compare_hf:
        device, dtype = str(llm.engine.device), str(llm.engine.dtype).removeprefix("torch.")
        del llm
        result = run_hf_baseline(args.model, args.num_prompts, args.input_len, args.output_len, device, dtype, args.seed)
        print("transformers generate:", result.report())
    return 0


def run_expert_load(llm, context):
    """The engine's expert load, summed over the data-parallel replicas (each counts its own tokens)."""
    from moeserve.bench.expert_load import ExpertLoad, from_engine

    load = from_engine(llm.engine)
    if context is None or context.groups.layout.dp == 1:
        return load
    import torch.distributed as dist

    counts = load.counts.to(llm.engine.device)
    dist.all_reduce(counts, group=context.groups.dp_group)
    return ExpertLoad(load.layers, counts.cpu())


def draw_expert_load(args: argparse.Namespace, load, redundant: int) -> None:
    from moeserve.bench.expert_load import show

    ranks = args.expert_load_ranks or (args.ep if args.ep > 1 else 8)
    print(show(load, ranks, redundant, args.expert_load, title=f"{args.model}: expert load"))
    print(f"expert load picture: {args.expert_load}")


def run_stats(args: argparse.Namespace) -> int:
    from moeserve.bench.expert_load import fetch_metrics, parse_metrics, served_imbalance, show

    text = fetch_metrics(args.url)
    load = parse_metrics(text)
    print(show(load, args.ranks, args.num_redundant_experts, args.plot, title=f"{args.url}: expert load"))
    served = served_imbalance(text)
    if served:
        worst = max(served, key=served.get)
        print(f"the server's own placement (its EP ranks' tokens): worst layer {worst} at {served[worst]:.3f}")
    if args.plot:
        print(f"picture: {args.plot}")
    return 0


def run_latency(args: argparse.Namespace) -> int:
    from moeserve.bench.latency import run_latency as measure
    from moeserve.llm import LLM

    if args.tp * args.dp * args.ep > 1:
        raise ValueError("bench latency steps one engine on one device; drop --tp/--dp/--ep")
    llm = LLM(args.model, **engine_args(args))
    device, dtype = str(llm.engine.device), str(llm.engine.dtype).removeprefix("torch.")
    results = [measure(llm, args.batch_size, args.input_len, args.output_len, args.num_iters, args.num_iters_warmup,
                       args.temperature, args.seed)]
    profiled = profile_latency(llm, args) if args.profile else None
    prefill_profiled = profile_latency_prefill(llm, args) if args.profile else None
    del llm
    hf_error = None
    if args.compare_hf:
        yardstick = hf_latency_or_reason(args, device, dtype)
        if isinstance(yardstick, str):
            hf_error = yardstick
            print(hf_error)
        else:
            results.append(yardstick)
    report_latency(args, device, dtype, results, (profiled, prefill_profiled), hf_error)
    return 0


def report_latency(args: argparse.Namespace, device: str, dtype: str, results: list, profiles, hf_error) -> None:
    from moeserve.bench.latency import HF_NOTE, TABLE_HEADER, table_row

    print(f"{args.model} on {device} ({dtype}): batch {args.batch_size}, {args.input_len} in / {args.output_len} out, "
          f"{args.num_iters} iterations\n{TABLE_HEADER}")
    print("\n".join(table_row(r) for r in results))
    if len(results) > 1:
        print(HF_NOTE)
    profiled, prefill_profiled = profiles
    if prefill_profiled is not None:
        print(prefill_profiled.report(f"prefill steps of {args.batch_size} x {args.input_len} tokens"))
    if profiled is not None:
        print(profiled.report(f"steady decode steps at batch {args.batch_size}"))
        if results[0].decode_step_ms is not None:  # the profiler slows the steps it watches
            step_ms = results[0].decode_step_ms["p50"]
            print(f"busy time per step against the unprofiled p50 step: {profiled.busy_ms_per_step:.3f} / "
                  f"{step_ms:.3f} ms = {100 * profiled.busy_ms_per_step / step_ms:.1f}%")
    if args.output_json:
        report = {"settings": {k: v for k, v in vars(args).items() if k != "run"}, "device": device, "dtype": dtype,
                  "results": [r.as_dict() for r in results],
                  "profile": profiled.as_dict() if profiled is not None else None,
                  "prefill_profile": prefill_profiled.as_dict() if prefill_profiled is not None else None,
                  "hf_error": hf_error}
        Path(args.output_json).write_text(json.dumps(report, indent=2))


def profile_latency(llm, args: argparse.Namespace):
    """The profile of steady decode steps of the batch, or None (with a word why) when there are none."""
    from moeserve.bench.latency import latency_params
    from moeserve.bench.profile import profile_engine
    from moeserve.bench.throughput import random_prompts

    steps = min(args.profile_steps, args.output_len - 3)  # past the first token and a warm-up decode step
    if steps < 1:
        print("--profile: --output-len leaves no steady decode step to profile (it needs at least 4)")
        return None
    prompts = random_prompts(llm.engine.config.vocab_size, args.batch_size, args.input_len, args.seed)
    return profile_engine(llm.engine, prompts, latency_params(args.output_len, args.temperature), steps, 1)


def profile_latency_prefill(llm, args: argparse.Namespace):
    """The profile of the steps that prefill the batch, on prompts no earlier iteration used (no prefix hits)."""
    from moeserve.bench.latency import latency_params
    from moeserve.bench.profile import profile_prefill
    from moeserve.bench.throughput import random_prompts

    unused_seed = args.seed + args.num_iters_warmup + args.num_iters + 1
    prompts = random_prompts(llm.engine.config.vocab_size, args.batch_size, args.input_len, unused_seed)
    return profile_prefill(llm.engine, prompts, latency_params(args.output_len, args.temperature))


def hf_latency_or_reason(args: argparse.Namespace, device: str, dtype: str):
    """transformers' latency on the same batch, or why transformers could not build the model."""
    import gc

    import torch

    from moeserve.bench.latency import run_hf_latency
    from moeserve.bench.throughput import build_hf_model, random_prompts
    from moeserve.loader.model_loader import load_config

    gc.collect()  # the engine's memory, before transformers allocates its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    config = load_config(args.model)
    try:
        hf_model = build_hf_model(args.model, device, dtype)
    except (ValueError, KeyError, ImportError, AttributeError, NotImplementedError) as error:
        return f"--compare-hf: transformers cannot build {args.model} ({config.architecture}): {error}"
    prompts = random_prompts(config.vocab_size, args.batch_size, args.input_len, args.seed)
    return run_hf_latency(hf_model, prompts, args.output_len, args.num_iters, args.num_iters_warmup, args.temperature)


def run_bench_ep(args: argparse.Namespace) -> int:
    from moeserve.config import ConfigError
    from moeserve.distributed.launch import launch, resolve_device
    from moeserve.distributed.layout import ParallelLayout

    args.device = resolve_device(args.device)
    if args.virtual_ranks:
        if args.comm_sms != "none":
            raise ConfigError("--comm-sms times multi-rank p2p exchanges; with --virtual-ranks every rank runs on one "
                              "device in turn (the puts beside compute on a budget: scripts/probes/ep_overlap.py)")
        return bench_ep_virtual(args)
    from moeserve.bench.ep import P2P_MODES
    from moeserve.distributed.ep.dispatchers import DISPATCHERS

    backends = set(args.backend.split(","))
    if backends - {*DISPATCHERS, *P2P_MODES}:
        raise ConfigError(f"unknown --backend {', '.join(sorted(backends - {*DISPATCHERS, *P2P_MODES}))}: use "
                          f"{', '.join((*DISPATCHERS, *P2P_MODES))}")
    if backends & set(P2P_MODES) and args.device == "cpu":
        raise ConfigError("--backend p2p puts tokens through GPU peer memory: use CUDA devices, or --virtual-ranks "
                          "with TRITON_INTERPRET=1 to run its kernels on the CPU")
    args.comm_sms_budgets = comm_sms_budgets(args.comm_sms)
    launch(ParallelLayout(dp=args.ranks, ep=args.ranks), args.device, args.dist_timeout, bench_ep_on_rank, args)
    return 0


def comm_sms_budgets(text: str) -> list[int | None]:
    """--comm-sms of bench ep: "none" or positive integers, comma-separated."""
    from moeserve.config import ConfigError

    budgets = []
    for item in (part.strip() for part in text.split(",")):
        if item == "none":
            budgets.append(None)
        elif item.isdecimal() and item.isascii() and int(item) > 0:
            budgets.append(int(item))
        else:
            raise ConfigError(f"--comm-sms takes none or positive SM counts, comma-separated; got {item!r} in {text!r}")
    return budgets


def bench_ep_on_rank(context, args: argparse.Namespace) -> None:

    import torch

    from moeserve.bench.ep import HEADER, P2P_MODES, measure_point, report_row
    from moeserve.distributed.launch import device_for_rank

    device = torch.device(device_for_rank(args.device, int(os.environ["LOCAL_RANK"])))
    if context.rank == 0:
        print(f"EP dispatch/combine: {args.ranks} ranks on {device.type}, hidden {args.hidden}, top-{args.topk} of "
              f"{args.experts} experts, uniform random routing\n{HEADER}", flush=True)
    for tokens in (int(t) for t in args.tokens_per_rank.split(",")):
        for fmt in args.format.split(","):
            for backend in args.backend.split(","):
                for budget in args.comm_sms_budgets if backend in P2P_MODES else [None]:
                    point = measure_point(tokens, args.hidden, args.topk, args.experts, fmt, backend, device,
                                          context.groups.ep_group, context.control, args.iterations, budget)
                    label = backend if budget is None else f"{backend}, {budget} SMs"
                    if context.rank == 0:
                        print(report_row(tokens, fmt, label, point), flush=True)


def bench_ep_virtual(args: argparse.Namespace) -> int:
    import itertools

    from moeserve.bench.ep_virtual import HEADER, measure_virtual, report_row
    from moeserve.config import ConfigError

    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("bench ep --virtual-ranks runs Triton kernels: use a CUDA device, or set TRITON_INTERPRET=1 "
                          "to interpret them on the CPU (slow)")
    print(f"EP dispatch/combine, peer-to-peer transport, virtual ranks on one {args.device} device, hidden "
          f"{args.hidden}, top-{args.topk} of {args.experts} experts, uniform and skewed routing; a dispatch ends with "
          "the rows where the experts read them (FP8 and NVFP4 still quantized: their conversion is the experts' "
          f"GEMM's, not timed here)\n{HEADER}", flush=True)
    for ranks in (int(r) for r in args.virtual_ranks.split(",")):
        if args.experts % ranks:
            raise ConfigError(f"--experts {args.experts} cannot be split over {ranks} virtual ranks")
        for tokens in (int(t) for t in args.tokens_per_rank.split(",")):
            for fmt in args.format.split(","):
                for mode, routing in itertools.product(args.virtual_modes.split(","), ("uniform", "skewed")):
                    point = measure_virtual(ranks, tokens, args.hidden, args.topk, args.experts, fmt, args.device,
                                            args.iterations, low_latency=mode == "low-latency",
                                            skewed=routing == "skewed")
                    print(report_row(ranks, tokens, fmt, mode, routing, point), flush=True)
    return 0


def run_bench_serve(args: argparse.Namespace) -> int:
    import asyncio

    from moeserve.bench.serve import plot, run_benchmark, save

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    load_before = server_expert_load(args.base_url) if args.expert_load else None
    report, results = asyncio.run(run_benchmark(args.base_url, args.model, args.num_prompts, args.input_len,
                                                args.output_len, args.request_rate, args.max_concurrency, args.seed,
                                                args.ignore_eos, args.api_key, args.vocab_size))
    print(report.text())
    failures = [r.error for r in results if not r.ok]
    if failures:
        print(f"first failure: {failures[0]}")
    if args.save_result:
        save(report, args.save_result, {k: v for k, v in vars(args).items() if k != "run"})
    if args.plot:
        plot(results, args.plot)
    if args.expert_load:
        from moeserve.bench.expert_load import ExpertLoad, show

        after = server_expert_load(args.base_url)
        if after.layers != load_before.layers or after.counts.shape != load_before.counts.shape:
            raise ValueError(f"the server at {args.base_url} changed model during the run")
        load = ExpertLoad(after.layers, after.counts - load_before.counts)  # this run's tokens only
        print(show(load, args.expert_load_ranks or 8, args.expert_load_redundant, args.expert_load,
                   title=f"{args.model}: expert load of the run"))
    return 0 if not failures else 1


def server_expert_load(url: str):
    from moeserve.bench.expert_load import fetch_metrics, parse_metrics

    return parse_metrics(fetch_metrics(url))


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def run_bench_attention(args: argparse.Namespace) -> int:
    import torch

    from moeserve.bench.attention import HEADER, measure, read_bandwidth_tb_per_s, row

    if not torch.cuda.is_available():
        raise ValueError("moeserve bench attention times CUDA kernels and needs a GPU")
    print(f"{torch.cuda.get_device_name()}: read bandwidth {read_bandwidth_tb_per_s('cuda'):.2f} TB/s "
          f"(sum over 4 GiB, same run); times are CUDA-graph replays\n{HEADER}", flush=True)
    for point in measure(args.shapes.split(","), int_list(args.batch), int_list(args.context), args.block_size, "cuda"):
        print(row(point), flush=True)
    return 0


def run_bench_moe(args: argparse.Namespace) -> int:
    import torch

    from moeserve.bench.moe import make_experts, measure, rowwise_baseline_weights
    from moeserve.loader.model_loader import load_config

    if not torch.cuda.is_available():
        raise ValueError("moeserve bench moe times CUDA kernels and needs a GPU")
    config = load_config(args.model)
    print(f"{args.model}: hidden {config.hidden_size}, expert intermediate {config.moe.intermediate_size}, "
          f"top-{config.moe.top_k}; {torch.cuda.get_device_name()}")
    if args.tune_output:
        return write_tuned_table(args, config)
    print("| local experts | tokens | implementation | ms | eager ms | TFLOP/s | weight TB/s |\n|---|---|---|---|---|---|---|")
    for count in (int(e) for e in args.local_experts.split(",")):
        for fmt in args.dtype.split(","):
            experts = make_experts(config, count, fmt, "cuda")
            rowwise = rowwise_baseline_weights(experts) if fmt == "fp8" else None
            for tokens in (int(t) for t in args.tokens.split(",")):
                for p in measure(config, experts, tokens, fmt, args.profile, rowwise):
                    print(f"| {count} | {tokens} | {p.name} | {p.milliseconds:.3f} | {p.eager_milliseconds:.3f} | "
                          f"{p.tflops:.1f} | {p.weight_tb_per_s:.2f} |", flush=True)
            del experts, rowwise
            torch.cuda.empty_cache()
    return 0


def write_tuned_table(args: argparse.Namespace, config) -> int:
    import datetime
    import json
    from dataclasses import asdict

    import torch

    from moeserve.bench.moe import make_experts, tune
    from moeserve.kernels.tuning import METHOD

    command = "moeserve bench moe " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                               if k in ("model", "local_experts", "tokens", "dtype"))
    path = Path(args.tune_output)
    table = json.loads(path.read_text()) if path.is_file() else {"card": torch.cuda.get_device_name(), "configs": {}}
    if table["card"] != torch.cuda.get_device_name():
        raise ValueError(f"{path} holds configs for {table['card']}, not this {torch.cuda.get_device_name()}")
    experts = int(args.local_experts.split(",")[0])
    top_k = min(config.moe.top_k, experts)
    for fmt in args.dtype.split(","):
        shape = f"{fmt}/{config.hidden_size}x{config.moe.intermediate_size}"
        table["configs"][shape] = {}  # a shape swept again loses its old entries
        table.setdefault("sweeps", {})[shape] = {"date": datetime.date.today().isoformat(), "method": METHOD,
                                                 "command": command}
        local = make_experts(config, experts, fmt, "cuda")
        for tokens in (int(t) for t in args.tokens.split(",")):
            best, ms = tune(config, local, tokens, "cuda")
            table["configs"][shape][str(tokens * top_k)] = asdict(best)
            print(f"| {fmt} | {tokens} tokens | {ms:.3f} ms | {asdict(best)} |", flush=True)
            # after every shape, whole or not at all: a sweep cut short keeps what it found
            partial = path.with_name(path.name + ".partial")
            partial.write_text(json.dumps(table, indent=2))
            os.replace(partial, path)
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from moeserve.config import ConfigError
    from moeserve.engine.plan import fits, plan_rank, report, smallest_fitting_layout

    request, gpu_name, num_gpus = plan_request(args)
    config = request.config
    weights_note = (f"{request.quantization} weights (quantized on load)" if request.quantization else
                    f"{request.checkpoint_plan.format} checkpoint" if request.checkpoint_plan else "bf16 weights")
    print(f"moeserve plan: {args.model} ({config.architecture}), {weights_note}, KV cache "
          f"{'fp8' if request.kv_cache_dtype == 'fp8' else 'bf16'}, max_model_len {request.model_len:,}, "
          f"max_num_seqs {request.max_num_seqs}, max_num_batched_tokens {request.max_num_batched_tokens:,}")
    if request.layout.world_size > num_gpus:
        raise ConfigError(f"the layout needs {request.layout.world_size} GPUs (tp x dp) but --num-gpus is {num_gpus}")
    memory = plan_rank(request)
    for line in report(request, memory, args.concurrency, gpu_name):
        print(line)
    if request.quantization is not None:
        bf16 = sum(plan_rank(dataclasses.replace(request, quantization=None)).weights.values())
        if bf16 > request.gpu_memory_utilization * request.gpu_memory:
            print(f"note: quantizing on load holds the bf16 shard first ({bf16 / 2**30:,.1f} GiB per rank): write an "
                  f"{request.quantization} checkpoint once with `moeserve quantize` and serve that")
    if fits(memory, request, args.concurrency):
        return 0
    found = smallest_fitting_layout(request, args.concurrency)
    if found is None:
        print(f"no layout of up to 256 {gpu_name} GPUs holds {args.concurrency} sequence(s) of {request.model_len:,} "
              "tokens: lower max_model_len or the concurrency, or quantize the weights / KV cache")
    else:
        layout, fitting = found
        print(f"smallest layout that fits: --tp {layout.tp} --dp {layout.dp} --ep {layout.ep} "
              f"({layout.world_size} GPUs; {fitting.kv_tokens:,} KV tokens per rank, "
              f"{fitting.concurrency(request.model_len):,} sequences at max_model_len)")
    return 1


def add_plan_arguments(plan: argparse.ArgumentParser) -> None:
    add_engine_arguments(plan, offline=False)
    plan.add_argument("--gpu", choices=("H100", "H200", "B200"), default="H200", help="the card (its memory)")
    plan.add_argument("--gpu-memory", type=byte_size, default=None, help="memory per GPU instead of --gpu's")
    plan.add_argument("--num-gpus", type=int, default=None, help="GPUs available (default: tp x dp)")
    plan.add_argument("--concurrency", type=int, default=1,
                      help="sequences of max_model_len tokens each rank's KV cache must hold at once")


def plan_request(args: argparse.Namespace):
    """(Request, card name, GPUs available) from plan's flags, resolved as the engine resolves them."""
    import torch

    from moeserve.distributed.layout import ParallelLayout
    from moeserve.engine.plan import GPU_MEMORY, Request
    from moeserve.loader.checkpoint import CheckpointReader
    from moeserve.loader.model_loader import checkpoint_quant_plan, load_config_and_scheme
    from moeserve.loader.resolve import resolve_checkpoint

    EngineArgs(model=args.model, **engine_args(args))  # the engine's own checks of every flag
    config, scheme = load_config_and_scheme(args.model)
    checkpoint_plan = None
    if scheme is not None:
        if args.quantization is not None:
            raise ValueError(f"{args.model} is already quantized ({scheme.name}); drop --quantization")
        with CheckpointReader(resolve_checkpoint(args.model)) as reader:
            checkpoint_plan = checkpoint_quant_plan(config, scheme, reader)
    layout = ParallelLayout(tp=args.tp, dp=args.dp, ep=args.ep)
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    dtype = getattr(torch, config.dtype if args.dtype == "auto" else args.dtype)  # as the engine resolves it
    request = Request(config, layout, args.quantization, checkpoint_plan, dtype, args.kv_cache_dtype,
                      args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens,
                      args.block_size,
                      args.gpu_memory or GPU_MEMORY[args.gpu], args.gpu_memory_utilization, args.kv_cache_memory,
                      args.num_redundant_experts, args.ep_dispatch_format,
                      enforce_eager=args.enforce_eager, ep_backend=args.ep_backend,
                      ep_max_tokens_per_rank=args.ep_max_tokens_per_rank,
                      ep_two_batch_overlap=args.ep_two_batch_overlap)
    gpu_name = args.gpu if args.gpu_memory is None else f"GPU of {args.gpu_memory / 2**30:,.1f} GiB"
    return request, gpu_name, args.num_gpus or layout.world_size


def run_info(args: argparse.Namespace) -> int:
    from moeserve.loader.build import planned_weight_bytes
    from moeserve.loader.model_loader import load_config

    config = load_config(args.model)
    print(f"{args.model}: {config.architecture}, {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.moe.num_experts} experts (top-{config.moe.top_k}), {len(config.moe_layers)} MoE layers")
    for fmt in (None, "fp8", "nvfp4"):
        sizes = planned_weight_bytes(config, fmt)
        detail = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(sizes.items()))
        print(f"  {fmt or 'bf16':>6}: {human_bytes(sum(sizes.values())):>10}  ({detail})")
    return 0


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def run_quantize(args: argparse.Namespace) -> int:

    import torch

    from moeserve.loader.model_loader import load_config, load_model
    from moeserve.loader.resolve import resolve_checkpoint
    from moeserve.quant.apply import quantize_model
    from moeserve.quant.export import write_quantized_checkpoint

    destination = Path(args.destination)
    if destination.exists():
        raise ValueError(f"{destination} already exists; choose a new folder")
    source = resolve_checkpoint(args.source)
    dtype = getattr(torch, load_config(source).dtype)
    model = load_model(source, dtype)
    plan = quantize_model(model, args.format)
    write_quantized_checkpoint(model, plan, source, destination)
    print(f"wrote {args.format} checkpoint to {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
