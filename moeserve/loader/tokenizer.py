"""The checkpoint's Hugging Face tokenizer (the tiny presets' own is written by loader/tiny_tokenizer.py)."""

from moeserve.loader.resolve import resolve_checkpoint


def load_tokenizer(name_or_path):
    """The checkpoint's tokenizer (transformers AutoTokenizer, offline), or a clear error if it has none."""
    from transformers import AutoTokenizer

    folder = resolve_checkpoint(name_or_path)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"{folder}: no tokenizer files; pass token ids instead of text")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
