"""Lazy reading and streamed writing of Hugging Face safetensors checkpoints.

Weight arithmetic over 7B+ models must not need a model in RAM, let alone two. Reading:
`Checkpoint` parses only the safetensors headers up front and loads one tensor at a time on
request (`safetensors.safe_open`, closed again right away so the mapped pages of a shard
do not pile up in the process's resident memory). Writing: `ShardedWriter` is told every
output tensor's name, shape and dtype before the first byte is written, so it can lay out
the shards and write each header first, then stream tensor bytes straight to their final
offsets: one tensor in memory at a time, no buffering of a whole shard.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from distill import DistillError
log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Small files a model directory needs besides its weights; copied through verbatim.
COPY_THROUGH = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
    "merges.txt", "spiece.model", "chat_template.json", "*.jinja",
]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]

# safetensors header dtype strings (see the format spec) <-> torch dtypes
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (decimal units as in transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10,
             "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit) and s[: -len(unit)]:
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    if s.isdigit():
        return int(s)
    raise DistillError(f"cannot parse size '{size}': use e.g. 5GB, 500MB or a number of bytes")


def dtype_from_name(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16; None stays None. A storage dtype,
    so "auto" (which `distill.io.models.torch_dtype` reads as the device default) is refused;
    the names are `torch_dtype`'s."""
    from distill.io.dtypes import torch_dtype

    if name is None or isinstance(name, torch.dtype):
        return name
    if str(name).lower() == "auto":
        raise DistillError(f"unknown floating-point dtype '{name}': use float32, bfloat16 or float16")
    try:
        return torch_dtype(name)
    except DistillError:
        raise DistillError(f"unknown floating-point dtype '{name}': use float32, bfloat16 or float16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor; reading it costs nothing."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # shard file name inside the checkpoint directory

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> dict:
    """Parse and validate one safetensors file's header without touching its data.

    Catches the truncated download/copy case (file shorter than its header says) with a
    message naming the file, instead of an opaque error deep inside a merge.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise DistillError(f"{path} is truncated or empty ({size} bytes); copy or download it again")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise DistillError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes "
                                   f"in a {size}-byte file); copy or download it again")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise DistillError(f"safetensors file {path} is missing; copy or download it again") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DistillError(f"{path} is not a valid safetensors file (unreadable header); "
                           f"copy or download it again") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise DistillError(f"{path} is truncated: its header needs {8 + header_len + end} bytes, the file has "
                           f"{size}; copy or download it again")
    return header


class Checkpoint:
    """A model (or chat vector) directory of safetensors weights, read lazily by tensor name.

    >>> ckpt = Checkpoint.open("path/to/model")
    >>> for name, tensor in ckpt.iter_tensors(): ...   # one tensor alive at a time
    """

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], config: dict | None):
        self.path = path
        self.tensors = tensors
        self.config = config or {}

    @classmethod
    def open(cls, ref: str | os.PathLike, what: str = "model", require_config: bool = True) -> "Checkpoint":
        """Read the index and headers of a model directory (or a hub id in the local HF cache)."""
        path = Path(os.path.expanduser(str(ref)))
        looks_like_path = path.is_absolute() or str(ref).startswith((".", "~")) or str(ref).count("/") > 1
        if not path.is_dir():
            if path.exists() or looks_like_path:
                raise DistillError(f"{what} directory {path} does not exist or is not a directory; check the path")
            if require_config:
                from distill.io.paths import resolve_model

                path = resolve_model(ref, what)
            else:
                raise DistillError(f"{what} directory {path} does not exist; check the path")
        config = None
        if (path / "config.json").exists():
            try:
                config = json.loads((path / "config.json").read_text())
            except json.JSONDecodeError as exc:
                raise DistillError(f"{path / 'config.json'} is not valid JSON ({exc}); repair or replace it") from None
        elif require_config:
            raise DistillError(f"{what} directory {path} has no config.json; point to a Hugging Face model directory")

        files = cls._weight_files(path, what)
        tensors: dict[str, TensorInfo] = {}
        for file, expected in files.items():
            header = read_header(path / file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _DTYPES:
                    raise DistillError(f"{path / file}: tensor {name} has dtype {meta['dtype']}, "
                                       f"which distill does not handle")
                if name in tensors:
                    raise DistillError(f"{what} {path}: tensor {name} appears in both {tensors[name].file} "
                                       f"and {file}; remove the stray shard")
                tensors[name] = TensorInfo(name, tuple(meta["shape"]), _DTYPES[meta["dtype"]], file)
            missing = [n for n in expected if n not in header]
            if missing:
                raise DistillError(f"{path / INDEX_NAME} maps {len(missing)} tensors to {file} that it does not "
                                   f"contain (e.g. {missing[:3]}); the shard or the index is stale - "
                                   f"copy the checkpoint again")
        if not tensors:
            raise DistillError(f"{what} {path} contains no tensors")
        return cls(path, tensors, config)

    @staticmethod
    def _weight_files(path: Path, what: str) -> dict[str, list[str]]:
        """{shard file: tensor names the index assigns to it} (names empty without an index)."""
        index = path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DistillError(f"{index} is not a valid safetensors index (needs a 'weight_map'); "
                                   f"copy it again") from None
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            for file in files:
                if not (path / file).exists():
                    raise DistillError(f"{path / file} is missing (listed in {index}); copy or download it again")
            return files
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if found:
            return {f: [] for f in found}
        pickles = sorted({p.name for pat in PICKLE_PATTERNS for p in path.glob(pat)})
        if pickles:
            raise DistillError(
                f"{what} {path} has only pickle weights ({', '.join(pickles[:4])}); distill never unpickles "
                f"weights. If you trust the checkpoint, convert it once: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{path}', use_safetensors=False)"
                f".save_pretrained('{path}-safetensors')\" (transformers loads it with torch.load(weights_only=True))")
        raise DistillError(f"{what} {path} has no *.safetensors weights")

    # -- reading -------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def get(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Load one tensor, or only its rows [start, stop) (a chunk, or the shared vocabulary)."""
        info = self.tensors[name]
        file = self.path / info.file
        whole = not info.shape or (start == 0 and (stop is None or stop >= info.shape[0]))
        try:
            # Opened per call on purpose: closing drops the mapping, so resident memory holds
            # the tensors in use, not every page of every shard read so far.
            with safe_open(file, framework="pt") as f:
                if whole:
                    return f.get_tensor(name)
                return f.get_slice(name)[start:stop]
        except DistillError:
            raise
        except Exception as exc:  # noqa: BLE001 - any low-level read failure names the file
            raise DistillError(f"cannot read tensor {name} from {file} ({exc}); the file may be damaged - "
                               f"copy or download it again") from None

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in on-disk order, one at a time."""
        for name in self.ordered(names):
            yield name, self.get(name)

    def ordered(self, names: Iterable[str] | None = None) -> list[str]:
        """Names sorted by shard file so reads sweep each file once, front to back."""
        names = list(self.tensors) if names is None else list(names)
        return sorted(names, key=lambda n: (self.tensors[n].file, n))

    def dtype(self) -> torch.dtype:
        """The checkpoint's dominant floating dtype (by bytes)."""
        weight: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                weight[info.dtype] = weight.get(info.dtype, 0) + info.nbytes
        return max(weight, key=weight.get) if weight else torch.float32


def copy_through(src: Path, dst: Path, patterns: Iterable[str] = COPY_THROUGH) -> list[str]:
    """Copy config, generation config and tokenizer files from one model dir to another."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns):
            shutil.copy2(p, Path(dst) / p.name)
            copied.append(p.name)
    return copied


class ShardedWriter:
    """Write a planned set of tensors as sharded safetensors, streaming one tensor at a time.

    Give it every tensor's (name, shape, dtype) up front; it assigns shards (in the given
    order, a new shard when the next tensor would exceed `max_shard_size`), writes each
    shard's header, and `write(name, tensor)` puts the bytes at their final offset. `close()`
    checks everything was written and writes `model.safetensors.index.json` (when there is
    more than one shard, as `save_pretrained` does).
    """

    def __init__(self, out_dir: str | os.PathLike, plan: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_size: int | str = "5GB", metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.max_shard_size = parse_size(max_shard_size)
        meta = {"format": "pt", **(metadata or {})}
        shards: list[list[TensorInfo]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            info = TensorInfo(name, tuple(int(d) for d in shape), dtype, "")
            if shards[-1] and size + info.nbytes > self.max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(info)
            size += info.nbytes
        n = len(shards)
        names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where: dict[str, tuple[str, int, TensorInfo]] = {}  # name -> (file, byte offset, info)
        self._pending: set[str] = set()
        self.total_size = 0
        for file, infos in zip(names, shards):
            header: dict = {"__metadata__": meta}
            offset = 0
            for info in infos:
                if info.name in header or info.name in self._where:
                    raise DistillError(f"tensor {info.name} planned twice")
                header[info.name] = {"dtype": _DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                                     "data_offsets": [offset, offset + info.nbytes]}
                offset += info.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
            data_start = 8 + len(blob)
            with open(self.out_dir / file, "wb") as f:
                f.write(struct.pack("<Q", len(blob)))
                f.write(blob)
                f.truncate(data_start + offset)  # full size now; a missed write is caught in close()
            for info in infos:
                self._where[info.name] = (file, data_start + header[info.name]["data_offsets"][0], info)
            self.total_size += offset
        self._pending = set(self._where)
        self._files = names
        self._fds: dict[str, int] = {}
        self._written: dict[str, int] = {}
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write a planned tensor, or its rows [start, start + len(tensor)) (safe from several threads)."""
        if name not in self._where:
            raise DistillError(f"tensor {name} was not in the writer's plan")
        file, offset, info = self._where[name]
        rows = info.shape[0] if info.shape else 1
        got_rows = tensor.shape[0] if tensor.dim() else 1
        if (tensor.dtype != info.dtype or tuple(tensor.shape[1:]) != info.shape[1:] or tensor.dim() != len(info.shape)
                or start < 0 or start + got_rows > rows):
            raise DistillError(f"tensor {name}: got rows {start}..{start + got_rows} of {tuple(tensor.shape)} "
                               f"{tensor.dtype}, planned {info.shape} {info.dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data
        position = offset + start * (info.nbytes // rows)
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(self.out_dir / file, os.O_WRONLY)
        while data:  # pwrite: no shared file position, so threads may write at once
            n = os.pwrite(fd, data, position)
            data, position = data[n:], position + n
        with self._lock:
            self._written[name] = self._written.get(name, 0) + got_rows * (info.nbytes // rows)
            if self._written[name] >= info.nbytes:
                self._pending.discard(name)

    def _close_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def close(self) -> list[str]:
        self._close_files()
        if self._pending:
            raise DistillError(f"{len(self._pending)} planned tensors were never written "
                               f"(e.g. {sorted(self._pending)[:3]})")
        if len(self._files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {n: w[0] for n, w in sorted(self._where.items())}}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self._files

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_files()
