"""What makes a checkpoint trustworthy before a run resumes from it.

    1. no code       the sharded optimizer state's `.metadata` (torch.distributed.checkpoint
                     writes it with pickle) is read by a restricted unpickler
    2. fingerprints  each checkpoint records the SHA-256 of its weight files and of the data
                     files the run trained on (fingerprint.json); --resume verifies them

A checkpoint whose weights were changed after it was written (zeroed in part, swapped for another
model's) would otherwise resume silently into a different run; a data file edited between runs
would change what the rest of the run trains on without any record. checkpoints.py calls these;
this module imports nothing else of the project.
"""

from __future__ import annotations

import glob
import hashlib
import json
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

FINGERPRINT = "fingerprint.json"       # inside a checkpoint folder


# =============================================================================================
# 1. No code: torch.distributed.checkpoint's metadata through a restricted unpickler
# =============================================================================================

class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's `.metadata` and nothing else: its dataclasses
    (torch.distributed.checkpoint.metadata, the file reader's _StorageInfo), torch.Size, the
    dtypes and layouts, and the file paths they name. Any other global - os.system, eval,
    subprocess - is refused before it is looked up, so a crafted file cannot run code."""

    ADMITTED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.metadata as dcp_metadata
        found = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        if isinstance(found, type) and found.__module__ == module:     # a class defined there
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in self.ADMITTED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class SafeCheckpointReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint's file reader, except that `.metadata` - a pickle, which
    the stock reader loads with plain pickle.load - goes through _DcpMetadataUnpickler. (The
    tensor shards themselves the stock reader already loads with weights_only=True.)"""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _DcpMetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as err:
            raise ValueError(f"{path} is not a checkpoint's metadata ({err}); it is refused, "
                             "because loading other objects can run code. train.py never "
                             "writes such a file: it was written or changed by something "
                             "else") from None
        if getattr(metadata, "storage_meta", None) is None:     # as the stock reader does
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# =============================================================================================
# 2. Fingerprints: the weight files' and the data files' SHA-256
# =============================================================================================

def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 16 MB pieces (about 1 GB/s: seconds for a 3B
    model's 7 GB of weights, once per checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: its safetensors files, and those of its LoRA
    adapter folder."""
    return sorted(p for p in folder.rglob("*.safetensors") if p.is_file())


def data_files(sources: list[str]) -> list[Path]:
    """The local files behind data sources: a file, every file in a folder (a parquet folder,
    a save_to_disk folder), every file a glob matches. A hub id has none (the hub's cache keeps
    its revision). The pictures the rows name are not included: they are checked per row."""
    found = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file())
        elif any(c in source for c in "*?["):
            found += sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    return [p.absolute() for p in found]


_HASHED: dict[tuple, str] = {}     # (path, size, mtime) -> sha256: each data file hashed once


def data_fingerprint(sources: list[str]) -> dict[str, dict]:
    """{file: {size, mtime, sha256}} of the data files behind `sources`. A file's hash is
    computed once per process (again only if its size or modification time changed)."""
    out = {}
    for path in data_files(sources):
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _HASHED:
            _HASHED[key] = file_sha256(path)
        out[str(path)] = {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": _HASHED[key]}
    return out


def write_fingerprint(folder: Path, sources: list[str]) -> None:
    """fingerprint.json of a checkpoint folder being written: its weight files' hashes and the
    data files' fingerprints."""
    record = {"weights": {str(p.relative_to(folder)): file_sha256(p) for p in weight_files(folder)},
              "data": data_fingerprint(sources)}
    (folder / FINGERPRINT).write_text(json.dumps(record, indent=2))


def read_fingerprint(folder: Path) -> dict | None:
    """A checkpoint's fingerprint.json; None for a checkpoint of an earlier version (none)."""
    path = folder / FINGERPRINT
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        assert isinstance(record.get("weights"), dict) and isinstance(record.get("data"), dict)
        return record
    except (ValueError, AssertionError, AttributeError) as err:
        raise ValueError(f"{path} is not a checkpoint fingerprint "
                         f"({err or 'wrong fields'})") from None


def weight_mismatches(folder: Path, record: dict) -> list[str]:
    """The weight files of `folder` that differ from its fingerprint, each named with why."""
    recorded = record["weights"]
    present = {str(p.relative_to(folder)): p for p in weight_files(folder)}
    problems = [f"{folder / name}: missing" for name in recorded if name not in present]
    problems += [f"{folder / name}: not in its fingerprint (added after it was written)"
                 for name in present if name not in recorded]
    problems += [f"{folder / name}: its bytes changed since the checkpoint was written"
                 for name, path in present.items()
                 if name in recorded and file_sha256(path) != recorded[name]]
    return problems


def data_changes(record: dict, sources: list[str]) -> dict[str, str]:
    """{file: what changed} for the data files the checkpoint recorded that differ now (same
    path): changed bytes, or gone. A file only the current sources name (another --data) is a
    settings change, which --resume reports on its own."""
    now = data_fingerprint(sources)
    changes = {}
    for path, then in record["data"].items():
        if path not in now:
            if not Path(path).exists():
                changes[path] = "no longer exists"
        elif now[path]["size"] != then["size"] or now[path]["sha256"] != then["sha256"]:
            changes[path] = (f"changed since the run trained on it (sha256 "
                             f"{then['sha256'][:12]}... -> {now[path]['sha256'][:12]}..., "
                             f"{then['size']} -> {now[path]['size']} bytes)")
    return changes


# =============================================================================================
# 3. A model folder's weight files, checked before anything loads them
# =============================================================================================

PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weight_file_problems(folder: Path) -> list[str]:
    """What stops a model folder's weights from loading, each naming its file, found before any
    load: pickled weights without safetensors (transformers would unpickle them, which can run
    code - refused, not loaded), and safetensors files shorter than their own header says (a
    copy cut short), which otherwise fail deep inside the loader."""
    if not folder.is_dir():
        return []
    tensors = sorted(folder.glob("*.safetensors"))
    pickled = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLED_WEIGHTS)
    if pickled and not tensors:
        return [f"{pickled[0]}: pickled weights, which loading would unpickle (that can run "
                "code); only safetensors weights are loaded - convert it with a tool you trust "
                "(save_pretrained(..., safe_serialization=True))"]
    return [problem for path in tensors if (problem := safetensors_problem(path))]


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (None if it is): its first 8 bytes give the length of
    a JSON header, which gives every tensor's byte range; the file must end where the last
    range does."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            if size < 8 or header_length > size - 8:
                raise ValueError("its header runs past the end of the file")
            header = json.loads(f.read(header_length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        return f"{path}: not a complete safetensors file ({err})"
    if size < 8 + header_length + end:
        return (f"{path}: truncated ({size} of {8 + header_length + end} bytes; a copy or "
                "download cut short?)")
    return None


def non_finite_weights(net) -> str | None:
    """"N NaN/inf values in NAME" for the first parameter holding any (each rank's own shards
    under FSDP), else None: such a model samples garbage or fails deep inside generate."""
    from torch.distributed.tensor import DTensor
    for name, p in net.named_parameters():
        local = (p.to_local() if isinstance(p, DTensor) else p).detach()
        bad = int((~torch.isfinite(local)).sum())
        if bad:
            return f"{bad} NaN/inf values in {name}"
    return None
