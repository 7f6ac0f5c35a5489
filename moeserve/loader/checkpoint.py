"""Reading a safetensors checkpoint folder: one file or shards listed by model.safetensors.index.json.

Tensors are memory-mapped and read one at a time; each file is opened once. Pickled formats
(.bin, .pt) are refused: unpickling runs code from the file.
"""

import json
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor and the file."""


def is_inside_folder(relative: str) -> bool:
    """A shard name that stays in the checkpoint folder: relative, and no '..' that climbs out. Checked on
    the name, not the resolved path: Hugging Face's cache links shards to blobs elsewhere, legitimately."""
    path = PurePosixPath(relative.replace("\\", "/"))
    if path.is_absolute() or relative.startswith(("/", "\\")) or ":" in relative:
        return False
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return False
    return depth > 0


class CheckpointReader:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._handles = {}
        self.file_of = self._index()  # tensor name -> file name

    def _index(self) -> dict[str, str]:
        index_path = self.folder / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
            for name, file in weight_map.items():
                if not isinstance(file, str) or not is_inside_folder(file):
                    raise CheckpointError(f"{index_path}: weight_map entry {name!r} names shard {file!r}, which is not "
                                          "a file name inside the checkpoint folder; refusing to load it")
            for file in sorted(set(weight_map.values())):
                if not (self.folder / file).is_file():
                    raise CheckpointError(f"{index_path} lists shard {file}, which is missing from {self.folder}")
            return weight_map
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in self.folder.glob("*") if p.suffix in (".bin", ".pt", ".pth")]
            hint = f" (found {', '.join(pickled)}: pickled weights are not loaded; convert them to safetensors)" if pickled else ""
            raise CheckpointError(f"{self.folder}: no *.safetensors files{hint}")
        return {name: f.name for f in files for name in self._open(f.name).keys()}

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.folder / file), framework="pt")
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise CheckpointError(f"{self.folder / file}: cannot read this safetensors file, it is damaged "
                                      f"or truncated ({e})") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.file_of)

    def path_of(self, name: str) -> Path:
        return self.folder / self.file_of[name]

    def shape(self, name: str) -> list[int]:
        return self._open(self.file_of[name]).get_slice(name).get_shape()

    def get(self, name: str) -> torch.Tensor:
        handle = self._open(self.file_of[name])
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path_of(name)}: cannot read tensor '{name}' ({e})") from None

    def get_slice(self, name: str, dim: int, start: int, end: int) -> torch.Tensor:
        """Rows (or columns, ...) [start, end) of a tensor along dim, read without the rest."""
        handle = self._open(self.file_of[name])
        index = tuple([slice(None)] * dim + [slice(start, end)])
        try:
            return handle.get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(f"{self.path_of(name)}: cannot read tensor '{name}' ({e})") from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
