"""Is a saved model's weights file whole? Answered from its header and size, without reading it.

A copy or download cut short leaves a file that transformers refuses only when a stage loads it,
with a library error (safetensors: "incomplete metadata, file not fully covered") that names
neither the file nor the fix. Both formats say how long they must be:

- safetensors: 8 bytes (little-endian u64) give the header's length, the JSON header gives each
  tensor's byte range in the data after it, so the file is exactly 8 + header + the last range's
  end bytes long (the safetensors library refuses any other length);
- torch.save's zip format (``pytorch_model.bin``) ends in the zip's central directory, which a
  cut file has lost.

A sharded save (``*.index.json``) is checked shard by shard, a missing shard included.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


def safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is {size} bytes, shorter than the 8-byte length a safetensors file starts with"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"is {size} bytes, but its header alone declares {8 + n}"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)  # fmt: skip
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has a header that is not a safetensors header"
    if 8 + n + end != size:
        return f"is {size} bytes, but its header declares {8 + n + end}"
    return None


def torch_problem(path: Path) -> str | None:
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch's legacy (pre-1.6) pickle: nothing to check cheaply
            return None
    try:
        zipfile.ZipFile(path).close()  # reads only the central directory at the end
    except zipfile.BadZipFile as err:
        return f"is not a whole zip archive ({err})"
    return None


def _file_problem(path: Path) -> str | None:
    if not path.is_file():
        return "is missing (the shard index names it)"
    return (safetensors_problem(path) if path.suffix == ".safetensors"
            else torch_problem(path))  # fmt: skip


def _weight_files(folder: Path) -> list[Path]:
    """The files transformers would read weights from, in its order of preference."""
    for single, index in (("model.safetensors", SAFETENSORS_INDEX),
                          ("pytorch_model.bin", TORCH_INDEX)):  # fmt: skip
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                shards = json.loads((folder / index).read_text())["weight_map"].values()
            except (ValueError, KeyError, AttributeError):
                return [folder / index]  # named as the broken file below
            return [folder / name for name in sorted(set(shards))]
    return []


def problem(folder: str | Path) -> tuple[Path, str] | None:
    """(the broken file, what is wrong with it) of the first cut or missing weights file in a
    local model ``folder``, or None (a hub name, a folder without weights, or whole files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for path in _weight_files(folder):
        if path.name.endswith(".index.json"):
            return path, "is not a readable shard index (a JSON object with a weight_map)"
        found = _file_problem(path)
        if found:
            return path, found
    return None


def require_intact(folder: str | Path, key: str) -> None:
    """One paragraph (SystemExit) if a weights file in ``folder`` is cut short or missing."""
    found = problem(folder)
    if found:
        path, what = found
        raise SystemExit(
            f"{key}: the weights file {path} {what}, so the model cannot be loaded (a copy or "
            "download cut short leaves such a file): copy or download the model again, or save "
            "it again with save_pretrained"
        )
