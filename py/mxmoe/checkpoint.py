"""MXFP4 (W4A4) expert weights in safetensors checkpoints, compressed-tensors / vLLM style.

A checkpoint holds, for every expert ``e`` of one MoE layer and every projection, two tensors::

    {prefix}.experts.{e}.gate_proj.weight_packed   uint8 [I, H/2]   E2M1 codes
    {prefix}.experts.{e}.gate_proj.weight_scale    uint8 [I, H/32]  E8M0 scales
    {prefix}.experts.{e}.up_proj.weight_packed     uint8 [I, H/2]
    {prefix}.experts.{e}.up_proj.weight_scale      uint8 [I, H/32]
    {prefix}.experts.{e}.down_proj.weight_packed   uint8 [H, I/2]
    {prefix}.experts.{e}.down_proj.weight_scale    uint8 [H, I/32]

with mxmoe's bit contract: element 2i of a row in the low nibble of byte i, one scale per 32
consecutive elements along K (the input dimension), scale byte s meaning 2^(s-127).
``weight_scale`` may also be stored as ``float8_e8m0fnu`` (same bytes). Other tensors in the
files (router, attention, other layers) are ignored.

``load_moe_weights`` assembles them into mxmoe's LINEAR interchange format:
w13 = cat(gate, up) along N -> packed [E, 2I, H/2] + scales [E, 2I, H/32], and
w2 = down -> packed [E, H, I/2] + scales [E, H, I/32]. ``save_moe_weights`` writes the inverse.
``MoELayer.from_checkpoint`` and ``MoELayer.save_checkpoint`` wrap both.

Files are read lazily: headers first (every name, shape and dtype is checked before any data is
read), then one tensor at a time, copied straight into the stacked output on the target device,
so peak memory is the layer plus one tensor.

Untrusted files: safetensors files are parsed here (not memory-mapped), every header entry is
checked against the file's size before anything is allocated, and tensors are read with plain
reads, so a truncated, corrupt or hostile file (or one truncated while it is open) raises
InvalidArgumentError naming the file, never SIGBUS or an allocation larger than the file; a
failed load returns nothing (no partial layer). Expert ids may have leading zeros
(``experts.007`` is expert 7).

Limits:
- One layer per call; fused-expert layouts (one [E, ...] tensor per projection, as in GPT-OSS's
  ``gate_up_proj_blocks``) and unquantized (bf16 ``weight``) experts are not read here: quantize
  bf16 weights with ``MoELayer.from_float`` and save them once with ``save_checkpoint``.
- Saving writes one file (no sharding).
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import re
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import save_file

from mxmoe import ops

__all__ = ["FORMATS", "PROJECTIONS", "load_moe_layer", "load_moe_weights", "save_gpt_oss",
           "save_moe_weights"]

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_KINDS = ("weight_packed", "weight_scale")
_E8M0 = getattr(torch, "float8_e8m0fnu", None)
_SCALE_DTYPES = (torch.uint8,) if _E8M0 is None else (torch.uint8, _E8M0)

# safetensors header dtype strings -> torch dtypes (for checks and messages before any data is
# read); names missing from this torch build stay strings.
_SAFETENSORS_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in (
        ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"), ("U16", "uint16"),
        ("I32", "int32"), ("U32", "uint32"), ("I64", "int64"), ("U64", "uint64"),
        ("F16", "float16"), ("BF16", "bfloat16"), ("F32", "float32"), ("F64", "float64"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
    )
    if hasattr(torch, attr)
}


def _dtype_str(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- The file layer: safetensors files read without mmap, index files, expert ids -------------

# Bytes per element of every safetensors dtype (for the header's size check; torch need not know
# the dtype). Sub-byte types ("F4", ...) are left out: a tensor of an unknown dtype is checked
# only for its offsets, and fails with a clear message if it is ever loaded.
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
    "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# safetensors itself refuses headers above 100 MB; a larger length field is a corrupt file.
_MAX_HEADER_BYTES = 100 * 1000 * 1000
# An index file maps names to shards; 64 MiB is far above any real model's.
_MAX_INDEX_BYTES = 64 * 1024 * 1024


def _corrupt(path: str, what: str) -> Exception:
    return ops._invalid(f"{path} is not a valid safetensors file: {what}")


class _SafetensorsFile:
    """One safetensors file: the header parsed and checked at open, tensors read on demand.

    Reads with plain file reads instead of mmap (what safetensors' ``safe_open`` uses): a file
    truncated or replaced while open then gives a short read and a clear error, never SIGBUS.
    Every header entry is checked against the file's size before anything is allocated, so a
    hostile header cannot make the loader allocate more than the file holds.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            # Unbuffered: a buffered reader would serve reads of a since-truncated file from bytes
            # it cached earlier.
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise ops._invalid(f"cannot open checkpoint file {path}: {e.strerror}") from None
        try:
            self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _parse_header(self) -> None:
        path = self.path
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._read_at(0, 8)
        if len(prefix) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise _corrupt(path, f"the header length field says {header_len} bytes but the file "
                                 f"has {size} bytes (truncated, or not safetensors)")
        raw = self._read_at(8, header_len)
        if len(raw) < header_len:
            raise _corrupt(path, f"read {len(raw)} of the {header_len} header bytes (truncated)")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _corrupt(path, f"the header is not valid JSON ({type(e).__name__}: "
                                 f"{str(e)[:200]})") from None
        if not isinstance(header, dict):
            raise _corrupt(path, f"the header must be a JSON object, got {type(header).__name__}")
        self._data_start = 8 + header_len
        data_bytes = size - self._data_start
        self._entries: dict[str, tuple[tuple[int, ...], str, int, int]] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            self._entries[name] = self._check_entry(name, entry, data_bytes)

    def _check_entry(self, name, entry, data_bytes):
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise _corrupt(self.path, f"{where}: the entry must be a JSON object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise _corrupt(self.path, f"{where}: dtype must be a string, got {dtype!r}")
        if not isinstance(shape, list) or not all(
                type(d) is int and d >= 0 for d in shape):  # type(): a bool is not a dim
            raise _corrupt(self.path, f"{where}: shape must be a list of non-negative integers, "
                                      f"got {str(shape)[:100]}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise _corrupt(self.path, f"{where}: data_offsets must be [begin, end], got "
                                      f"{str(offsets)[:100]}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            raise _corrupt(self.path, f"{where}: data_offsets [{begin}, {end}] are outside the "
                                      f"{data_bytes} data bytes of the file (truncated?)")
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None:
            count = 1
            for d in shape:
                count *= d  # Python ints: a hostile shape cannot overflow, only mismatch
            if count * itemsize != end - begin:
                raise _corrupt(self.path, f"{where}: shape {shape} of {dtype} is "
                                          f"{count * itemsize} bytes but data_offsets "
                                          f"[{begin}, {end}] hold {end - begin}")
        return tuple(shape), dtype, begin, end

    def _read_at(self, offset: int, count: int, out: memoryview | None = None) -> bytes | int:
        """Reads `count` bytes at `offset` (into `out` when given): fewer only at end of file."""
        view = memoryview(bytearray(count)) if out is None else out
        self._file.seek(offset)
        done = 0
        while done < count:
            got = self._file.readinto(view[done:count])
            if not got:
                break
            done += got
        return bytes(view[:done]) if out is None else done

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        shape, dtype, _, _ = self._entries[name]
        return shape, dtype

    def read(self, name: str) -> torch.Tensor:
        """The tensor as a new CPU tensor (at most the bytes its header entry declares)."""
        shape, dtype, begin, end = self._entries[name]
        torch_dtype = _SAFETENSORS_DTYPES.get(dtype)
        if torch_dtype is None or dtype not in _SAFETENSORS_ITEMSIZE:
            raise ops._invalid(f"{name} in {self.path} has dtype {dtype}, which this torch build "
                               f"cannot hold")
        out = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            done = self._read_at(self._data_start + begin, end - begin, memoryview(out.numpy()))
            if done < end - begin:
                raise ops._invalid(f"{self.path} was truncated while reading {name}: read {done} "
                                   f"of {end - begin} bytes at offset "
                                   f"{self._data_start + begin}")
        return out.view(torch_dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()


def _read_index(path: str) -> dict[str, str]:
    """A *.safetensors.index.json -> tensor name -> shard path (each checked to exist)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise ops._invalid(f"cannot read checkpoint index {path}: {e.strerror}") from None
    if len(raw) > _MAX_INDEX_BYTES:
        raise ops._invalid(f"checkpoint index {path} is larger than {_MAX_INDEX_BYTES} bytes")
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ops._invalid(f"checkpoint index {path} is not valid JSON ({type(e).__name__}: "
                           f"{str(e)[:200]})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ops._invalid(f"{path} has no \"weight_map\" object (a safetensors index maps "
                           f"tensor names to files)")
    base = os.path.dirname(path)
    shards: dict[str, str] = {}
    checked: set[str] = set()
    for name, file in weight_map.items():
        if (not isinstance(file, str) or not file or os.path.isabs(file)
                or os.path.normpath(file).startswith("..")):
            raise ops._invalid(f"{path} maps {name!r} to {str(file)[:100]!r}; expected the name "
                               f"of a shard beside the index")
        shard = os.path.join(base, file)
        if shard not in checked:
            if not os.path.isfile(shard):
                raise ops._invalid(f"{path} maps {name!r} to {file}, which does not exist")
            checked.add(shard)
        shards[name] = shard
    return shards


class _Tensors:
    """name -> (shape, dtype) and name -> tensor over a dict or safetensors files.

    Files are opened once (headers read and checked, see _SafetensorsFile) and stay open until
    the ExitStack closes them. Every error names the file it comes from.
    """

    def __init__(self, path_or_tensors, stack: contextlib.ExitStack):
        self._dict: Mapping | None = None
        self._files: dict[str, _SafetensorsFile] = {}  # name -> the file holding it
        self._aliases: dict[str, str] = {}  # canonical expert name -> the name as stored
        if isinstance(path_or_tensors, Mapping):
            self._dict = path_or_tensors
            self.source = f"the tensor dict ({len(path_or_tensors)} tensors)"
            return
        paths, index = _checkpoint_files(path_or_tensors)
        self.source = paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
        for path in paths:
            file = _SafetensorsFile(path)
            stack.callback(file.close)
            for name in file.keys():  # noqa: SIM118 (a file, not a dict)
                if name in self._files:
                    raise ops._invalid(f"{name} is stored twice: in {self._files[name].path} "
                                       f"and in {path}")
                self._files[name] = file
        index_path, index_map = index if index is not None else ("", {})
        for name, shard in index_map.items():
            if name not in self._files or self._files[name].path != shard:
                held = f"it is in {self._files[name].path}" if name in self._files else \
                    "no shard holds it"
                raise ops._invalid(f"{index_path} maps {name} to {shard}, but {held}")

    def names(self) -> list[str]:
        return list(self._dict if self._dict is not None else self._files)

    def alias(self, canonical: str, stored: str) -> None:
        """Lets ``canonical`` (e.g. experts.7.x) find the tensor stored as ``stored``
        (experts.007.x)."""
        if canonical != stored:
            self._aliases[canonical] = stored

    def _stored(self, name: str) -> str:
        return self._aliases.get(name, name)

    def describe(self, name: str) -> str:
        """The name as stored, and its file when there are files: for messages."""
        name = self._stored(name)
        if self._dict is not None:
            return name
        return f"{name} (in {self._files[name].path})"

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        name = self._stored(name)
        if self._dict is not None:
            t = self._dict[name]
            if not isinstance(t, torch.Tensor):
                raise ops._invalid(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            return tuple(t.shape), t.dtype
        shape, dtype = self._files[name].meta(name)
        return shape, _SAFETENSORS_DTYPES.get(dtype, dtype)

    def load(self, name: str) -> torch.Tensor:
        name = self._stored(name)
        if self._dict is not None:
            return self._dict[name].detach()
        return self._files[name].read(name)


def _checkpoint_files(path_or_paths) -> tuple[list[str], tuple[str, dict[str, str]] | None]:
    """A file, a directory of *.safetensors, a *.safetensors.index.json, or a list of files ->
    (the files, (the index's path, its name -> file map) or None)."""
    if isinstance(path_or_paths, (str, os.PathLike)):
        path = os.fspath(path_or_paths)
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path)
                           if f.endswith(".safetensors"))
            if not files:
                raise ops._invalid(f"the directory {path} holds no *.safetensors files")
            return files, None
        if path.endswith(".json"):
            index = _read_index(path)
            return sorted(set(index.values())), (path, index)
        paths = [path]
    elif isinstance(path_or_paths, Sequence) and all(
            isinstance(p, (str, os.PathLike)) for p in path_or_paths):
        paths = [os.fspath(p) for p in path_or_paths]
        if not paths:
            raise ops._invalid("path_or_tensors is an empty list of files")
    else:
        raise ops._invalid(f"path_or_tensors must be a safetensors path, a list of paths or a "
                           f"dict name -> tensor, got {type(path_or_paths).__name__}")
    for path in paths:
        if not os.path.isfile(path):
            raise ops._invalid(f"checkpoint file {path} does not exist")
    return paths, None


# Expert ids are decimal (ASCII digits only: \d would take other scripts' digits); more than 9
# digits is no real layer's and cannot be a valid id of the C API (E <= 65536).
_MAX_EXPERT_ID_DIGITS = 9


def _expert_names(head: str, tensors: _Tensors) -> dict[int, set[str]]:
    """expert id -> the '{proj}.{kind}' suffixes present as {head}{e}.{proj}.{kind}.

    Ids written with leading zeros (experts.007.*) are the same expert as experts.7.*: the
    canonical name is registered as an alias of the stored one; both spellings at once fail.
    """
    pattern = re.compile(rf"{re.escape(head)}([0-9]+)\.([A-Za-z0-9_]+\.[A-Za-z0-9_]+)")
    found: dict[int, set[str]] = {}
    spelled: dict[str, str] = {}  # canonical name -> stored name
    for name in tensors.names():
        match = pattern.fullmatch(name)
        if not match:
            continue
        digits, suffix = match.group(1), match.group(2)
        if len(digits) > _MAX_EXPERT_ID_DIGITS:
            raise ops._invalid(f"{tensors.describe(name)} has expert id {digits[:20]}"
                               f"{'...' if len(digits) > 20 else ''}, beyond any layer's "
                               f"experts (at most {_MAX_EXPERT_ID_DIGITS} digits)")
        e = int(digits)
        canonical = f"{head}{e}.{suffix}"
        if canonical in spelled:
            raise ops._invalid(f"expert {e} is stored twice: as "
                               f"{tensors.describe(spelled[canonical])} and as "
                               f"{tensors.describe(name)}")
        spelled[canonical] = name
        tensors.alias(canonical, name)
        found.setdefault(e, set()).add(suffix)
    return found


def _local_experts(expert_map, num_experts: int | None, found: dict[int, set[str]],
                   head: str, tensors: _Tensors) -> tuple[int, Sequence[int]]:
    """-> (E_global, the global expert id of each local expert in local order)."""
    if expert_map is not None:
        m = ops._tensor(expert_map, "expert_map") if not isinstance(expert_map, Sequence) \
            else torch.as_tensor(list(expert_map))
        if m.dim() != 1 or m.dtype.is_floating_point or m.dtype == torch.bool:
            raise ops._invalid(f"expert_map must be a 1-D integer [E_global] tensor, got shape "
                               f"{ops._shape_str(m.shape)} dtype {_dtype_str(m.dtype)}")
        ids = m.tolist()
        global_experts = len(ids)
        if num_experts is not None and int(num_experts) != global_experts:
            raise ops._invalid(f"num_experts={num_experts} disagrees with expert_map of "
                               f"{global_experts} entries [E_global]")
        kept = sorted((local, g) for g, local in enumerate(ids) if local >= 0)
        if [local for local, _ in kept] != list(range(len(kept))):
            raise ops._invalid(f"expert_map must map the kept experts onto local ids 0..L-1, "
                               f"each once; got local ids {sorted(lo for lo, _ in kept)}")
        if not kept:
            raise ops._invalid("expert_map keeps no experts (every entry is -1)")
        order = [g for _, g in kept]
        bound = f"expert_map has {global_experts} entries"
    else:
        if num_experts is None:
            if not found:
                sample = [n for n in tensors.names() if ".experts." in n][:3]
                raise ops._invalid(
                    f"no tensors named {head}<e>.<proj>.weight_packed in {tensors.source}"
                    + (f"; names with '.experts.' look like {sample}" if sample else ""))
            global_experts = max(found) + 1
        else:
            try:
                if isinstance(num_experts, bool):
                    raise TypeError
                global_experts = operator.index(num_experts)
            except TypeError:
                raise ops._invalid(f"num_experts must be an int, got {num_experts!r}") from None
            if global_experts < 1:
                raise ops._invalid(f"num_experts must be >= 1, got {num_experts}")
        # A range, not a list: a stray id (experts.100000000.*) must cost nothing before
        # _check_present reports the experts it implies are missing.
        order = range(global_experts)
        bound = f"num_experts={global_experts}"
    beyond = sorted(e for e in found if e >= global_experts)
    if beyond:
        raise ops._invalid(f"the checkpoint holds expert {beyond[0]} ({head}{beyond[0]}.*) but "
                           f"{bound}")
    return global_experts, order


def _check_present(order: Sequence[int], found: dict[int, set[str]], head: str,
                   tensors: _Tensors) -> None:
    wanted = [f"{proj}.{kind}" for proj in PROJECTIONS for kind in _KINDS]
    # Work in proportion to the tensors found, not to len(order) (which a stray id can make
    # 10^9): the first gap is at most len(found) + 1 experts in, the count is arithmetic.
    first = None
    for e in order:
        absent = [w for w in wanted if w not in found.get(e, ())]
        if absent:
            first = (e, absent[0])
            break
    if first is None:
        return
    kept = order if isinstance(order, range) else set(order)
    total = len(order) * len(wanted) - sum(
        sum(w in found[e] for w in wanted) for e in found if e in kept)
    e, suffix = first
    name = f"{head}{e}.{suffix}"
    if e not in found:
        what = f"expert {e} is missing (no {head}{e}.* tensors)"
    else:
        what = f"expert {e} has no {suffix.split('.')[0]} {suffix.split('.')[1]}"
    hint = ""
    unquantized = f"{head}{e}.{suffix.split('.')[0]}.weight"
    if unquantized in tensors.names():
        shape, dtype = tensors.meta(unquantized)
        hint = (f"; it has {unquantized} {ops._shape_str(shape)} {_dtype_str(dtype)}, an "
                f"unquantized weight: quantize with MoELayer.from_float")
    more = f" ({total - 1} more tensors missing)" if total > 1 else ""
    raise ops._invalid(f"{what}: {name} not found in {tensors.source}{more}{hint}")


def _check_meta(tensors: _Tensors, name: str, layout: str, dtypes) -> tuple[int, int]:
    """Rank and dtype from the header; returns the 2-D shape."""
    shape, dtype = tensors.meta(name)
    desc = f"{tensors.describe(name)} has shape {ops._shape_str(shape)} dtype {_dtype_str(dtype)}"
    if len(shape) != 2:
        raise ops._invalid(f"{desc}; expected a 2-D {_dtype_names(dtypes)} {layout}")
    if dtype not in dtypes:
        raise ops._invalid(f"{desc}; expected dtype {_dtype_names(dtypes)} {layout}")
    return shape


def _dtype_names(dtypes) -> str:
    return " or ".join(_dtype_str(d) for d in dtypes)


def load_moe_weights(path_or_tensors, prefix: str, num_experts: int | None = None,
                     expert_map=None, device=None) -> tuple[torch.Tensor, ...]:
    """Reads one MoE layer's MXFP4 experts from a checkpoint (see the module docstring).

    Parameters
    ----------
    path_or_tensors : str, os.PathLike, list of paths, or dict
        A safetensors file, a list of files (a sharded checkpoint), a directory of
        ``*.safetensors`` files, a ``*.safetensors.index.json``, or a dict name -> tensor.
    prefix : str
        The layer's name, e.g. ``"model.layers.0.mlp"`` (tensors ``{prefix}.experts.{e}.*``).
    num_experts : int, optional
        E_global, the experts of the layer in the checkpoint; default: one more than the largest
        expert id found. Every expert 0..E-1 must be present (all six tensors).
    expert_map : torch.Tensor or sequence of int, optional
        [E_global] global -> local expert id, -1 = not loaded (expert parallelism): local expert
        ``l`` is read from the global expert ``g`` with ``expert_map[g] == l``. Local ids must be
        0..L-1, each once; only the kept experts need to be in the checkpoint.
    device : torch.device or str, optional
        Where the weights are assembled; default CPU.

    Returns
    -------
    w13_packed : torch.Tensor
        [E, 2I, H/2] uint8 (rows [0, I) gate, [I, 2I) up); E = local experts.
    w13_scales : torch.Tensor
        [E, 2I, H/32] uint8.
    w2_packed : torch.Tensor
        [E, H, I/2] uint8.
    w2_scales : torch.Tensor
        [E, H, I/32] uint8.

    Raises
    ------
    InvalidArgumentError (a ValueError)
        A missing expert or projection, a wrong dtype or rank, H or I inconsistent across
        experts or projections, scales that do not match their packed codes (K/32 vs K/2), H or
        I not a multiple of 32. The message names the tensor, its shape and dtype, and what
        was expected.
    """
    prefix = prefix.rstrip(".")
    head = f"{prefix}.experts." if prefix else "experts."
    with contextlib.ExitStack() as stack:
        tensors = _Tensors(path_or_tensors, stack)
        found = _expert_names(head, tensors)
        _, order = _local_experts(expert_map, num_experts, found, head, tensors)
        _check_present(order, found, head, tensors)

        # Every header first, so a bad checkpoint fails before any data is read.
        shapes: dict[str, tuple[int, int]] = {}
        for e in order:
            for proj in PROJECTIONS:
                layout = "[H, I/2]" if proj == "down_proj" else "[I, H/2]"
                packed = f"{head}{e}.{proj}.weight_packed"
                scale = f"{head}{e}.{proj}.weight_scale"
                shapes[packed] = _check_meta(tensors, packed, layout + " (E2M1 codes)",
                                             (torch.uint8,))
                shapes[scale] = _check_meta(tensors, scale, layout.replace("/2", "/32") +
                                            " (E8M0 scales)", _SCALE_DTYPES)

        # H and I from the first local expert's gate_proj; everything else must agree.
        reference = f"{head}{order[0]}.gate_proj.weight_packed"
        i, half_h = shapes[reference]
        h = 2 * half_h
        for symbol, value, what in (("H", h, f"2 * {half_h}"), ("I", i, "its rows")):
            if value % ops.BLOCK_SIZE:
                raise ops._invalid(
                    f"{tensors.describe(reference)} [I, H/2] has shape "
                    f"{ops._shape_str(shapes[reference])} dtype uint8, so {symbol} = {what} = "
                    f"{value}, which is not a multiple of 32 (MXFP4 blocks of 32 along K)")
        dims = f"H={h}, I={i} from {reference}"
        for e in order:
            for proj in PROJECTIONS:
                n, k, layout = (h, i, "[H, I/2]") if proj == "down_proj" else (i, h, "[I, H/2]")
                packed = f"{head}{e}.{proj}.weight_packed"
                scale = f"{head}{e}.{proj}.weight_scale"
                if shapes[packed] != (n, k // 2):
                    raise ops._invalid(
                        f"{tensors.describe(packed)} has shape "
                        f"{ops._shape_str(shapes[packed])} dtype uint8; expected {layout} = "
                        f"{ops._shape_str((n, k // 2))} ({dims}): inconsistent H or I")
                if shapes[scale] != (n, k // 32):
                    raise ops._invalid(
                        f"{tensors.describe(scale)} has shape {ops._shape_str(shapes[scale])} "
                        f"dtype {_dtype_str(tensors.meta(scale)[1])}; "
                        f"expected {layout.replace('/2', '/32')} = {ops._shape_str((n, k // 32))}"
                        f" to match its weight_packed {ops._shape_str((n, k // 2))} "
                        f"(K/32 = {k // 32} scales per row for K/2 = {k // 2} code bytes)")

        count = len(order)
        w13_packed = torch.empty(count, 2 * i, h // 2, dtype=torch.uint8, device=device)
        w13_scales = torch.empty(count, 2 * i, h // 32, dtype=torch.uint8, device=device)
        w2_packed = torch.empty(count, h, i // 2, dtype=torch.uint8, device=device)
        w2_scales = torch.empty(count, h, i // 32, dtype=torch.uint8, device=device)
        targets = {
            "gate_proj": (w13_packed[:, :i], w13_scales[:, :i]),
            "up_proj": (w13_packed[:, i:], w13_scales[:, i:]),
            "down_proj": (w2_packed, w2_scales),
        }
        for local, e in enumerate(order):
            for proj, (packed_out, scales_out) in targets.items():
                for kind, out in zip(_KINDS, (packed_out, scales_out), strict=True):
                    t = tensors.load(f"{head}{e}.{proj}.{kind}")
                    out[local].copy_(t.view(torch.uint8) if t.dtype != torch.uint8 else t)
    return w13_packed, w13_scales, w2_packed, w2_scales


def save_moe_weights(path, prefix: str, w13_packed: torch.Tensor, w13_scales: torch.Tensor,
                     w2_packed: torch.Tensor, w2_scales: torch.Tensor, expert_map=None,
                     scale_dtype: torch.dtype = torch.uint8,
                     metadata: Mapping[str, str] | None = None,
                     extra: Mapping[str, torch.Tensor] | None = None) -> None:
    """Writes LINEAR expert weights as a per-expert safetensors checkpoint (the module format).

    Parameters
    ----------
    path : str or os.PathLike
        The ``.safetensors`` file to write (replaced if it exists).
    prefix : str
        The layer's name; tensors are ``{prefix}.experts.{e}.{proj}.{weight_packed|weight_scale}``.
    w13_packed, w13_scales : torch.Tensor
        [E, 2I, H/2] and [E, 2I, H/32] uint8 (rows [0, I) gate, [I, 2I) up).
    w2_packed, w2_scales : torch.Tensor
        [E, H, I/2] and [E, H, I/32] uint8.
    expert_map : torch.Tensor, optional
        [E_global] global -> local id: local expert l is saved under the global id g with
        ``expert_map[g] == l``, so loading with the same map gives the same layer.
    scale_dtype : torch.dtype
        uint8 (default) or float8_e8m0fnu for the ``weight_scale`` tensors (same bytes).
    metadata : mapping of str to str, optional
        Extra safetensors header metadata.
    extra : mapping of str to torch.Tensor, optional
        More tensors for the same file (router, correction bias, shared experts).
    """
    w13_packed, w13_scales = ops._check_linear_weights(w13_packed, w13_scales, "w13_packed",
                                                       "w13_scales")
    w2_packed, w2_scales = ops._check_linear_weights(w2_packed, w2_scales, "w2_packed",
                                                     "w2_scales")
    if scale_dtype not in _SCALE_DTYPES:
        raise ops._invalid(f"scale_dtype must be {_dtype_names(_SCALE_DTYPES)}, got "
                           f"{_dtype_str(scale_dtype)}")
    e, two_i, _ = w13_packed.shape
    i = two_i // 2
    if w2_packed.shape[0] != e or w2_packed.shape[2] * 2 != i:
        raise ops._invalid(f"w13_packed {ops._shape_str(w13_packed.shape)} [E, 2I, H/2] and "
                           f"w2_packed {ops._shape_str(w2_packed.shape)} [E, H, I/2] disagree")
    global_ids = list(range(e))
    if expert_map is not None:
        ids = ops._tensor(expert_map, "expert_map").tolist()
        for g, local in enumerate(ids):
            if 0 <= local < e:
                global_ids[local] = g
    prefix = prefix.rstrip(".")
    head = f"{prefix}.experts." if prefix else "experts."
    tensors = {}
    for local, g in enumerate(global_ids):
        parts = {
            "gate_proj": (w13_packed[local, :i], w13_scales[local, :i]),
            "up_proj": (w13_packed[local, i:], w13_scales[local, i:]),
            "down_proj": (w2_packed[local], w2_scales[local]),
        }
        for proj, (packed, scales) in parts.items():
            # clone(): safetensors refuses tensors that share storage.
            tensors[f"{head}{g}.{proj}.weight_packed"] = packed.to("cpu", copy=True)
            tensors[f"{head}{g}.{proj}.weight_scale"] = scales.to("cpu", copy=True).view(
                scale_dtype)
    for name, t in (extra or {}).items():
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    header = {"format": "pt", "mxmoe.quantization": "mxfp4-w4a4"}
    header.update(metadata or {})
    save_file(tensors, os.fspath(path), metadata=header)


# ---- Model formats (above the file layer) --------------------------------------------------------
#
# load_moe_layer reads one MoE block in the format its model ships, and returns the constructor
# arguments of MoELayer:
#
# "gpt-oss" (transformers / OpenAI names, MXFP4 already, same bit contract as mxmoe's):
#     {prefix}.experts.gate_up_proj_blocks  uint8 [E, 2I, H/32, 16]   rows interleaved: 2j gate,
#     {prefix}.experts.gate_up_proj_scales  uint8 [E, 2I, H/32]       2j+1 up (de-interleaved
#     {prefix}.experts.gate_up_proj_bias    bf16/fp32 [E, 2I]         once here: an exact
#     {prefix}.experts.down_proj_blocks     uint8 [E, H, I/32, 16]    permutation of rows)
#     {prefix}.experts.down_proj_scales     uint8 [E, H, I/32]
#     {prefix}.experts.down_proj_bias       bf16/fp32 [E, H]
#     {prefix}.router.weight / .bias        [E, H] / [E]
#   -> activation swiglu_oai (alpha 1.702, limit from config.json's swiglu_limit or 7.0),
#      routing topk_softmax, top_k from config.json's num_experts_per_tok when present.
# "compressed-tensors" (per-expert, load_moe_weights above), plus, when present:
#     {prefix}.gate.weight                       [E, H] router (DeepSeek-V3, Qwen3: mlp.gate)
#     {prefix}.gate.e_score_correction_bias      [E] (DeepSeek-V3: sigmoid grouped routing)
#     {prefix}.shared_experts.{gate,up,down}_proj.{weight_packed,weight_scale}
#                                                (or an unquantized bf16 .weight, quantized
#                                                here): shared experts, stored after the routed
#                                                ones; a shared MLP of n*I rows becomes n experts
#   -> DeepSeek-V3 routing options from config.json (n_group, topk_group, routed_scaling_factor,
#      norm_topk_prob, num_experts_per_tok), which is required when the correction bias exists
#      and no options are given (guessing the groups would route wrongly).
# "auto" picks "gpt-oss" when {prefix}.experts.gate_up_proj_blocks exists, else
# "compressed-tensors".

FORMATS = ("auto", "gpt-oss", "compressed-tensors")
_BIAS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_GPT_OSS = ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
            "down_proj_blocks", "down_proj_scales", "down_proj_bias")


def _model_config(path_or_tensors) -> dict:
    """config.json next to the checkpoint (a directory, a file in it, or an index), or {}."""
    if not isinstance(path_or_tensors, (str, os.PathLike)):
        if isinstance(path_or_tensors, Sequence) and path_or_tensors and isinstance(
                path_or_tensors[0], (str, os.PathLike)):
            path_or_tensors = path_or_tensors[0]
        else:
            return {}
    path = os.fspath(path_or_tensors)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return {}
    with open(config) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ops._invalid(f"{config} must hold a JSON object, got {type(data).__name__}")
    return data.get("text_config", data) if isinstance(data.get("text_config"), dict) else data


def _meta_checked(tensors: _Tensors, name: str, shape: tuple, dtypes, layout: str):
    if name not in tensors.names():
        raise ops._invalid(f"{name} not found in {tensors.source}; expected {layout} "
                           f"{_dtype_names(dtypes)}")
    got_shape, dtype = tensors.meta(name)
    if tuple(got_shape) != tuple(shape) or dtype not in dtypes:
        raise ops._invalid(f"{tensors.describe(name)} has shape {ops._shape_str(got_shape)} "
                           f"dtype {_dtype_str(dtype)}; expected {layout} = "
                           f"{ops._shape_str(shape)} {_dtype_names(dtypes)}")


def _kept_experts(expert_map, num_experts: int) -> list[int] | None:
    if expert_map is None:
        return None
    ids = (ops._tensor(expert_map, "expert_map").tolist() if not isinstance(expert_map, Sequence)
           else list(expert_map))
    if len(ids) != num_experts:
        raise ops._invalid(f"expert_map has {len(ids)} entries but the checkpoint has "
                           f"{num_experts} experts [E_global]")
    kept = sorted((local, g) for g, local in enumerate(ids) if local >= 0)
    if [local for local, _ in kept] != list(range(len(kept))) or not kept:
        raise ops._invalid(f"expert_map must map the kept experts onto local ids 0..L-1, each "
                           f"once; got local ids {sorted(lo for lo, _ in kept)}")
    return [g for _, g in kept]


def _load_gpt_oss(tensors: _Tensors, prefix: str, expert_map, device, config: dict) -> dict:
    head = f"{prefix}.experts." if prefix else "experts."
    blocks = f"{head}gate_up_proj_blocks"
    shape, dtype = tensors.meta(blocks)
    if len(shape) != 4 or shape[3] != 16 or dtype != torch.uint8:
        raise ops._invalid(f"{tensors.describe(blocks)} has shape {ops._shape_str(shape)} dtype "
                           f"{_dtype_str(dtype)}; expected [E, 2I, H/32, 16] uint8")
    e, two_i, h_blocks, _ = shape
    h = h_blocks * 32
    if two_i % 64:
        raise ops._invalid(f"{tensors.describe(blocks)} has 2I = {two_i} rows; I must be a "
                           f"multiple of 32")
    i = two_i // 2
    expected = {
        "gate_up_proj_blocks": ((e, 2 * i, h // 32, 16), (torch.uint8,), "[E, 2I, H/32, 16]"),
        "gate_up_proj_scales": ((e, 2 * i, h // 32), _SCALE_DTYPES, "[E, 2I, H/32]"),
        "gate_up_proj_bias": ((e, 2 * i), _BIAS_DTYPES, "[E, 2I]"),
        "down_proj_blocks": ((e, h, i // 32, 16), (torch.uint8,), "[E, H, I/32, 16]"),
        "down_proj_scales": ((e, h, i // 32), _SCALE_DTYPES, "[E, H, I/32]"),
        "down_proj_bias": ((e, h), _BIAS_DTYPES, "[E, H]"),
    }
    for suffix, (want, dtypes, layout) in expected.items():
        _meta_checked(tensors, head + suffix, want, dtypes,
                      f"{layout} (H={h}, I={i}, E={e} from {blocks})")
    router = f"{prefix}.router." if prefix else "router."
    has_router = f"{router}weight" in tensors.names()
    if has_router:
        _meta_checked(tensors, f"{router}weight", (e, h), _BIAS_DTYPES, "[E, H]")
        _meta_checked(tensors, f"{router}bias", (e,), _BIAS_DTYPES, "[E]")
    kept = _kept_experts(expert_map, e)
    index = None if kept is None else torch.tensor(kept)

    def load(name, dims=None):
        t = tensors.load(name)
        t = t.view(torch.uint8) if t.dtype == _E8M0 else t
        if index is not None:
            t = t.index_select(0, index)
        if dims is not None:
            t = t.reshape(t.shape[0], *dims)
        return t.to(device)

    def deinterleave(t):  # rows 2j (gate) first, then rows 2j+1 (up)
        return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1).contiguous()

    out = {
        "w13_packed": deinterleave(load(head + "gate_up_proj_blocks", (2 * i, h // 2))),
        "w13_scales": deinterleave(load(head + "gate_up_proj_scales")),
        "w13_bias": deinterleave(load(head + "gate_up_proj_bias")),
        "w2_packed": load(head + "down_proj_blocks", (h, i // 2)).contiguous(),
        "w2_scales": load(head + "down_proj_scales").contiguous(),
        "w2_bias": load(head + "down_proj_bias").contiguous(),
        "activation": "swiglu_oai",
        "swiglu_alpha": 1.702,
        "swiglu_limit": float(config.get("swiglu_limit", 7.0)),
        "routing": "topk_softmax",
    }
    top_k = config.get("num_experts_per_tok", config.get("experts_per_token"))
    if top_k is not None:
        out["top_k"] = int(top_k)
    if has_router:
        # The router keeps every global expert; only the expert weights are local.
        weight, bias = tensors.load(f"{router}weight"), tensors.load(f"{router}bias")
        out["router_weight"], out["router_bias"] = weight.to(device), bias.to(device)
    return out


def _load_shared_experts(tensors: _Tensors, prefix: str, h: int, i: int, device):
    """-> (w13_packed, w13_scales, w2_packed, w2_scales) of the shared experts, or None."""
    head = f"{prefix}.shared_experts." if prefix else "shared_experts."
    names = set(tensors.names())
    if not any(n.startswith(head) for n in names):
        return None
    parts = {}
    for proj in PROJECTIONS:
        packed, scale, plain = (f"{head}{proj}.weight_packed", f"{head}{proj}.weight_scale",
                                f"{head}{proj}.weight")
        down = proj == "down_proj"
        if packed in names:
            layout = "[H, I_s/2]" if down else "[I_s, H/2]"
            n, half_k = _check_meta(tensors, packed, layout + " (E2M1 codes)", (torch.uint8,))
            _meta_checked(tensors, scale, (n, half_k * 2 // 32), _SCALE_DTYPES,
                          layout.replace("/2", "/32") + " (E8M0 scales)")
            t_scale = tensors.load(scale)
            parts[proj] = (tensors.load(packed),
                           t_scale.view(torch.uint8) if t_scale.dtype != torch.uint8 else t_scale)
        elif plain in names:
            layout = "[H, I_s]" if down else "[I_s, H]"
            _check_meta(tensors, plain, layout, _BIAS_DTYPES)
            w = tensors.load(plain)
            w = w if w.dtype in (torch.bfloat16, torch.float16) else w.to(torch.bfloat16)
            p, s = ops.quantize_weights(w.unsqueeze(0))
            parts[proj] = (p[0], s[0])
        else:
            raise ops._invalid(f"shared expert {proj} missing: neither {packed} nor {plain} in "
                               f"{tensors.source}")
    gate_p, gate_s = parts["gate_proj"]
    up_p, up_s = parts["up_proj"]
    down_p, down_s = parts["down_proj"]
    i_shared = gate_p.shape[0]
    want = {"gate_proj": ((i_shared, h // 2), gate_p), "up_proj": ((i_shared, h // 2), up_p),
            "down_proj": ((h, i_shared // 2), down_p)}
    for proj, (shape, t) in want.items():
        if tuple(t.shape) != shape:
            raise ops._invalid(f"{head}{proj} has packed shape {ops._shape_str(t.shape)}; "
                               f"expected {ops._shape_str(shape)} (H={h} of the routed experts, "
                               f"I_s={i_shared} from {head}gate_proj)")
    if i_shared % i:
        raise ops._invalid(f"{head}gate_proj has {i_shared} rows, not a multiple of the routed "
                           f"experts' I = {i}: the shared MLP cannot be split into experts")
    n = i_shared // i
    # Splitting I_s into n experts of I: rows of gate/up and the matching columns of down.
    w13_p = torch.stack([torch.cat([gate_p[j * i:(j + 1) * i], up_p[j * i:(j + 1) * i]])
                         for j in range(n)])
    w13_s = torch.stack([torch.cat([gate_s[j * i:(j + 1) * i], up_s[j * i:(j + 1) * i]])
                         for j in range(n)])
    w2_p = torch.stack([down_p[:, j * i // 2:(j + 1) * i // 2] for j in range(n)])
    w2_s = torch.stack([down_s[:, j * i // 32:(j + 1) * i // 32] for j in range(n)])
    return tuple(t.contiguous().to(device) for t in (w13_p, w13_s, w2_p, w2_s))


def _load_compressed_tensors(tensors: _Tensors, path_or_tensors, prefix: str, num_experts,
                             expert_map, device, config: dict, explicit: set) -> dict:
    w13_p, w13_s, w2_p, w2_s = load_moe_weights(path_or_tensors, prefix, num_experts=num_experts,
                                                expert_map=expert_map, device=device)
    h, i = w2_p.shape[1], w2_p.shape[2] * 2
    out = {}
    gate = f"{prefix}.gate." if prefix else "gate."
    names = set(tensors.names())
    global_experts = (len(expert_map) if expert_map is not None else w13_p.shape[0])
    if f"{gate}weight" in names:
        _meta_checked(tensors, f"{gate}weight", (global_experts, h), _BIAS_DTYPES,
                      "[E_global, H] router")
        out["router_weight"] = tensors.load(f"{gate}weight").to(device)
    correction = f"{gate}e_score_correction_bias"
    if correction in names:
        _meta_checked(tensors, correction, (global_experts,), _BIAS_DTYPES, "[E_global]")
        out["e_score_correction_bias"] = tensors.load(correction).to(device)
        out["routing"] = "sigmoid_grouped_topk"
        if "router_weight" in out:  # DeepSeek-V3 computes its router logits in float32
            out["router_weight"] = out["router_weight"].to(torch.float32)
        keys = {"n_group": "num_expert_groups", "topk_group": "topk_groups",
                "routed_scaling_factor": "routed_scaling_factor",
                "norm_topk_prob": "renormalize"}
        for key, option in keys.items():
            if key in config:
                out[option] = config[key]
        if "num_expert_groups" not in out and "num_expert_groups" not in explicit:
            raise ops._invalid(
                f"{tensors.describe(correction)} marks a DeepSeek-V3 style router, but no "
                f"config.json with n_group/topk_group/routed_scaling_factor is next to the "
                f"checkpoint: pass num_expert_groups, topk_groups, routed_scaling_factor and "
                f"top_k to from_checkpoint")
    top_k = config.get("num_experts_per_tok")
    if top_k is not None:
        out["top_k"] = int(top_k)
    if "norm_topk_prob" in config:
        out["renormalize"] = bool(config["norm_topk_prob"])
    shared = _load_shared_experts(tensors, prefix, h, i, device)
    if shared is not None:
        w13_p, w13_s, w2_p, w2_s = (torch.cat([a, b]) for a, b in zip(
            (w13_p, w13_s, w2_p, w2_s), shared, strict=True))
        out["num_shared_experts"] = shared[0].shape[0]
    out.update(w13_packed=w13_p, w13_scales=w13_s, w2_packed=w2_p, w2_scales=w2_s)
    return out


def load_moe_layer(path_or_tensors, prefix: str, format: str = "auto",
                   num_experts: int | None = None, expert_map=None, device=None,
                   explicit_options=()) -> dict:
    """One MoE block in its model's checkpoint format -> MoELayer keyword arguments.

    See the section comment above for the formats. ``explicit_options`` names the options the
    caller sets itself (so a missing config.json is not an error for them). Returns a dict with
    w13_packed, w13_scales, w2_packed, w2_scales and the model options found.
    """
    if format not in FORMATS:
        raise ops._invalid(f"format must be one of {', '.join(repr(f) for f in FORMATS)}, got "
                           f"{format!r}")
    prefix = prefix.rstrip(".")
    config = _model_config(path_or_tensors)
    with contextlib.ExitStack() as stack:
        tensors = _Tensors(path_or_tensors, stack)
        blocks = f"{prefix}.experts.gate_up_proj_blocks" if prefix else \
            "experts.gate_up_proj_blocks"
        if format == "auto":
            format = "gpt-oss" if blocks in tensors.names() else "compressed-tensors"
        if format == "gpt-oss":
            if blocks not in tensors.names():
                raise ops._invalid(f"format='gpt-oss' but {blocks} is not in {tensors.source} "
                                   f"(expected [E, 2I, H/32, 16] uint8)")
            if num_experts is not None:
                e = tensors.meta(blocks)[0][0]
                if int(num_experts) != e:
                    raise ops._invalid(f"num_experts={num_experts} but {tensors.describe(blocks)}"
                                       f" holds {e} experts")
            return _load_gpt_oss(tensors, prefix, expert_map, device, config)
        return _load_compressed_tensors(tensors, path_or_tensors, prefix, num_experts,
                                        expert_map, device, config, set(explicit_options))


def save_gpt_oss(path, prefix: str, w13_packed, w13_scales, w2_packed, w2_scales, w13_bias,
                 w2_bias, router_weight=None, router_bias=None,
                 extra: Mapping[str, torch.Tensor] | None = None) -> None:
    """Writes one layer in GPT-OSS's MXFP4 checkpoint format (gate/up rows re-interleaved)."""
    e, two_i, half_h = w13_packed.shape
    i = two_i // 2

    def interleave(t):
        out = torch.empty_like(t)
        out[:, 0::2], out[:, 1::2] = t[:, :i], t[:, i:]
        return out

    head = f"{prefix}.experts." if prefix else "experts."
    h = w2_packed.shape[1]
    tensors = {
        head + "gate_up_proj_blocks": interleave(w13_packed).reshape(e, two_i, half_h // 16, 16),
        head + "gate_up_proj_scales": interleave(w13_scales),
        head + "gate_up_proj_bias": interleave(w13_bias),
        head + "down_proj_blocks": w2_packed.reshape(e, h, i // 32, 16),
        head + "down_proj_scales": w2_scales,
        head + "down_proj_bias": w2_bias,
    }
    if router_weight is not None:
        router = f"{prefix}.router." if prefix else "router."
        tensors[router + "weight"] = router_weight
        tensors[router + "bias"] = router_bias
    tensors.update(extra or {})
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
              os.fspath(path), metadata={"format": "pt"})
