"""The `moeserve` command."""

import argparse
import logging
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeserve", description="Serve Mixture-of-Experts language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete a prompt greedily (no KV cache yet)")
    generate.add_argument("--model", required=True, help="checkpoint folder or preset name (e.g. tiny-deepseek-v3)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    generate.add_argument("--device", default="cpu")
    generate.set_defaults(run=run_generate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, CheckpointError: the message says what to do
        print(f"moeserve: error: {e}", file=sys.stderr)
        return 2


def run_generate(args: argparse.Namespace) -> int:
    from moeserve import load_model, load_tokenizer
    from moeserve.generate import greedy_generate

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    model = load_model(args.model, DTYPES[args.dtype], args.device)
    tokenizer = load_tokenizer(args.model)
    prompt_ids = tokenizer.encode(args.prompt)
    output_ids = greedy_generate(model, prompt_ids, args.max_tokens)
    print(args.prompt + tokenizer.decode(output_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
