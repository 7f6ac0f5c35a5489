from moeserve.bench.throughput import run_throughput
from moeserve.cli import main
from moeserve.llm import LLM
from moeserve.sampling_params import SamplingParams


def test_generate_prints_prompt_and_completion_through_the_engine(capsys):
    args = ["generate", "--model", "tiny-qwen2-moe", "--prompt", "Once upon a time", "--prompt", "Hello",
            "--max-tokens", "8", "--temperature", "0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    outputs = LLM("tiny-qwen2-moe").generate(["Once upon a time", "Hello"], SamplingParams(temperature=0, max_tokens=8))
    assert printed == "".join(f"prompt: {prompt!r}\ncompletion: {o.outputs[0].text!r} ({o.outputs[0].finish_reason})\n"
                              for prompt, o in zip(["Once upon a time", "Hello"], outputs))


def test_seeded_sampling_from_the_command_line_is_reproducible(capsys):
    def generate(engine_seed, sampling_seed):
        assert main(["generate", "--model", "tiny-mixtral", "--prompt", "Hi", "--max-tokens", "16", "--temperature",
                     "1.0", "--seed", str(engine_seed), "--sampling-seed", str(sampling_seed)]) == 0
        return capsys.readouterr().out

    first = generate(1, 3)
    assert generate(2, 3) == first  # the request's own seed decides, not the engine's
    assert generate(1, 4) != first


def test_bench_throughput_reports_rates(capsys):
    args = ["bench", "throughput", "--model", "tiny-mixtral", "--num-prompts", "4", "--input-len", "8", "--output-len", "4"]
    assert main(args) == 0
    assert "4 requests in" in capsys.readouterr().out
    result = run_throughput(LLM("tiny-mixtral"), num_prompts=4, input_len=8, output_len=4)
    assert (result.prompt_tokens, result.output_tokens) == (32, 16)  # every request ran its full length


def test_bad_arguments_are_clear_errors(capsys):
    assert main(["generate", "--model", "nope", "--prompt", "x"]) == 2
    assert "neither a checkpoint folder nor a preset" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-mixtral", "--prompt", "x", "--top-p", "2"]) == 2
    assert "SamplingParams.top_p must be in (0, 1]" in capsys.readouterr().err
    # a flag no rank can take fails once, before any rank starts, with the message alone
    assert main(["generate", "--model", "tiny-deepseek-v3", "--prompt", "x", "--dp", "2", "--ep", "2",
                 "--device", "cpu", "--ep-comm-sms", "8"]) == 2
    err = capsys.readouterr().err
    assert "EngineArgs.ep_comm_sms" in err and "p2p EP backend" in err and "Traceback" not in err


def test_tokens_per_step_default_is_larger_offline_than_served():
    import argparse

    from moeserve.cli import add_engine_arguments
    from moeserve.engine.args import OFFLINE_MAX_NUM_BATCHED_TOKENS, EngineArgs
    from moeserve.llm import LLM

    def default(offline: bool) -> int:
        parser = argparse.ArgumentParser()
        add_engine_arguments(parser, offline=offline)
        return parser.parse_args(["--model", "m"]).max_num_batched_tokens

    served = EngineArgs(model="m").max_num_batched_tokens
    assert (default(True), default(False)) == (OFFLINE_MAX_NUM_BATCHED_TOKENS, served) and served < default(True)
    assert LLM("tiny-mixtral").engine.scheduler.max_num_batched_tokens == OFFLINE_MAX_NUM_BATCHED_TOKENS
    assert LLM("tiny-mixtral", max_num_batched_tokens=7).engine.scheduler.max_num_batched_tokens == 7
