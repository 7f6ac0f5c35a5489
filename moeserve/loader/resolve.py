"""A model name -> its checkpoint folder: a folder on disk, or a tiny preset's (written on first use)."""

from pathlib import Path

from moeserve.config import ConfigError
from moeserve.loader import presets


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A checkpoint folder, or the folder of a tiny preset (written on first use)."""
    if str(name_or_path) in presets.TINY_PRESETS:
        return presets.materialize(str(name_or_path))
    if str(name_or_path) in presets.SHAPE_PRESETS:
        raise ConfigError(f"'{name_or_path}' is a config-only preset (real shapes, no weights): use "
                          "moeserve.load_config for its config, or build_model + random_init for benchmarks")
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"'{name_or_path}' is neither a checkpoint folder nor a preset "
                          f"(presets: {', '.join(presets.all_names())})")
    return path
