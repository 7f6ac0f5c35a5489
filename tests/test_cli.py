import torch

import moeserve
from moeserve.cli import main
from moeserve.generate import greedy_generate


def test_generate_prints_prompt_and_greedy_completion(capsys):
    assert main(["generate", "--model", "tiny-qwen2-moe", "--prompt", "Once upon a time", "--max-tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip()
    model = moeserve.load_model("tiny-qwen2-moe", progress=False)
    tokenizer = moeserve.load_tokenizer("tiny-qwen2-moe")
    expected = greedy_generate(model, tokenizer.encode("Once upon a time"), 8)
    assert printed == "Once upon a time" + tokenizer.decode(expected)


def test_greedy_generate_takes_the_argmax_each_step():
    model = moeserve.load_model("tiny-mixtral", progress=False)
    prompt = [5, 17, 42]
    output = greedy_generate(model, prompt, 5)
    ids = torch.tensor([prompt + output])
    logits = model(ids)[0]
    for i, token in enumerate(output):
        assert token == int(logits[len(prompt) - 1 + i].argmax())


def test_bad_model_name_is_a_clear_error(capsys):
    assert main(["generate", "--model", "nope", "--prompt", "x"]) == 2
    assert "neither a checkpoint folder nor a preset" in capsys.readouterr().err
