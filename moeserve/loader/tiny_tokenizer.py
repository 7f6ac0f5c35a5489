"""The tiny presets' tokenizer: a byte-level BPE trained on a paragraph of prose, written as tokenizer.json."""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: the tiny presets' bos, eos, pad
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Text the tiny tokenizer learns its merges from; any English prose would do.
_CORPUS = """\
A mixture of experts model sends every token to a few of its many experts. The router scores each
expert, keeps the best ones, and the layer adds up what those experts return, weighted by the scores.
Serving such a model well means moving tokens between graphics cards quickly, keeping the attention
cache small, and batching many requests together so that every expert sees enough work.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
Once upon a time there was a small model that wanted to write stories about the sea and the stars.
It learned the names of numbers: one, two, three, four, five, six, seven, eight, nine and ten.
The engine schedules requests, the cache stores keys and values in blocks, and the sampler picks
the next token with temperature, top-k and top-p. When memory runs out the newest request waits.
def main():\n    print("hello")\n    return 0\n
"""


def train_tiny_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer)
    return tokenizer


def write_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    train_tiny_tokenizer(vocab_size).save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "model_max_length": 4096,
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
