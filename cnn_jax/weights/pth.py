"""PyTorch `.pth` state dicts, read with torch where it is installed and without it otherwise.

    load_state_dict(path, reader="auto") -> {key: numpy array}

`reader="torch"` is `torch.load(path, weights_only=True)`. `reader="builtin"` (what "auto"
falls back to when torch is not importable) reads the two formats torch.save writes:

- the zip archive of torch >= 1.6: `<name>/data.pkl` is a pickle whose tensors refer, by a
  persistent id ("storage", StorageType, key, location, numel), to raw little-endian storages
  `<name>/data/<key>`; `<name>/byteorder` says the byte order where it exists;
- the legacy format (torch < 1.6, and `torch.save(..., _use_new_zipfile_serialization=False)`;
  the published torchvision VGG files are this one): five pickles in a row (magic number,
  protocol version 1001, system info, the object with persistent ids that also carry a view's
  offset, the list of storage keys), then each listed storage as an int64 element count and
  its raw bytes.

Tensors are rebuilt by torch._utils._rebuild_tensor_v2 (or the older _rebuild_tensor) from
(storage, offset, size, stride). The unpickler here is restricted: it resolves only those
functions, the storage types and collections.OrderedDict, and refuses every other global, so
a file cannot make it run code. The still older tar format of torch < 0.1.10 is not read.

`write_pth` writes the same two formats from numpy arrays, without torch (tests, and anyone
making a torchvision-layout file without torch); torch.load reads them (tests/test_weights.py).
"""

import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile

import ml_dtypes
import numpy as np

from cnn_jax.errors import UserError

READERS = ("auto", "torch", "builtin")

# torch's storage classes, by the name a pickle refers to them with, and their element types.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}

# The legacy format's first two pickles (torch/serialization.py).
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001


class _Storage:
    """A storage the pickle refers to: its element type, key and length; `data` (bytes) is
    filled in from the zip entry or, in the legacy format, from what follows the pickles."""

    __slots__ = ("data", "dtype", "key", "numel")

    def __init__(self, dtype: np.dtype, key: str, numel: int):
        self.dtype, self.key, self.numel, self.data = dtype, key, numel, None


class _TensorRef:
    """A tensor of the pickle, made into a numpy array once every storage is read."""

    __slots__ = ("offset", "size", "storage", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride):
    view = storage if isinstance(storage, tuple) else (storage, 0)
    return _TensorRef(view[0], view[1] + storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, *metadata):
    del requires_grad, hooks, metadata
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, *state):
    del requires_grad, hooks, state
    return data


# Every global a state dict's pickle may name; anything else is refused.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals of a state dict; storages through `persistent_load`."""

    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and _text(pid[0]) == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{storage_type!r:.80} is not a storage type")
        key = _text(key)
        storage = self.storages.setdefault(key, _Storage(storage_type.dtype, key, int(numel)))
        view = pid[5] if len(pid) > 5 else None  # legacy: (view key, offset, view numel)
        return storage if view is None else (storage, int(view[1]))


def _text(value) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


# --- Reading --------------------------------------------------------------------------------


def load_state_dict(path: str, reader: str = "auto") -> dict[str, np.ndarray]:
    """{key: array} of the state dict in `path`. UserError (one line naming the file) when it
    is missing, truncated, not a state dict, or names a global a state dict does not."""
    if reader not in READERS:
        raise UserError(f"--reader={reader!r} is not one of: {', '.join(READERS)}")
    if not os.path.isfile(path):
        raise UserError(
            f"--file={path} does not exist"
            if not os.path.exists(path)
            else f"--file={path} is not a file"
        )
    if reader == "torch" or (reader == "auto" and _torch_importable()):
        return _load_with_torch(path)
    return read_pth(path)


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _load_with_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError("--reader=torch needs PyTorch; --reader=builtin reads without it") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch: RuntimeError, pickle.UnpicklingError, EOFError, ...
        raise UserError(f"--file={path} is not a readable PyTorch file: {_first_line(e)}") from e

    def to_numpy(tensor):
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.float().numpy().astype(ml_dtypes.bfloat16)
        return tensor.numpy()

    return _check_flat(path, obj, lambda v: isinstance(v, torch.Tensor), to_numpy)


def read_pth(path: str) -> dict[str, np.ndarray]:
    """The state dict in `path` without torch (zip or legacy format, see the module doc)."""
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        if head.startswith(b"PK"):
            obj = _read_zip(path)
        elif _is_tar(path):
            raise UserError(
                f"--file={path} is in the tar format of torch < 0.1.10, which only torch reads "
                "(install torch, or re-save it with a newer torch)"
            )
        else:
            obj = _read_legacy(path)
    except UserError:
        raise
    except zipfile.BadZipFile as e:
        raise UserError(
            f"--file={path} is not a readable PyTorch file: a zip archive that does not open "
            f"(truncated?): {_first_line(e)}"
        ) from e
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        struct.error,
        OSError,
    ) as e:
        raise UserError(f"--file={path} is not a readable PyTorch file: {_first_line(e)}") from e
    return _check_flat(path, obj, lambda v: isinstance(v, _TensorRef), _materialise)


def _is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _read_zip(path: str):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"a zip archive with {len(pickles)} data.pkl records, not one")
        prefix = pickles[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        byteorder = archive.read(order).decode().strip() if order in names else "little"
        storages: dict[str, _Storage] = {}
        obj = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
        for storage in storages.values():
            data = archive.read(f"{prefix}data/{storage.key}")  # CRC-checked: a cut file fails
            storage.data = _with_byteorder(data, storage, byteorder == "little")
    return obj


def _read_legacy(path: str):
    with open(path, "rb") as f:
        plain = _StateDictUnpickler(f, {})  # the first three pickles name no globals
        if plain.load() != LEGACY_MAGIC_NUMBER:
            raise ValueError("no PyTorch magic number at the start")
        if plain.load() != LEGACY_PROTOCOL_VERSION:
            raise ValueError("an unknown legacy protocol version")
        little = bool(plain.load().get("little_endian", True))
        storages: dict[str, _Storage] = {}
        obj = _StateDictUnpickler(f, storages).load()
        keys = [_text(k) for k in _StateDictUnpickler(f, {}).load()]
        for key in keys:
            storage = storages[key]
            (numel,) = struct.unpack("<q" if little else ">q", _exactly(f, 8))
            storage.data = _with_byteorder(
                _exactly(f, numel * storage.dtype.itemsize), storage, little
            )
    return obj


def _exactly(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"the file ends {n - len(data)} bytes early (truncated)")
    return data


def _with_byteorder(data: bytes, storage: _Storage, little: bool) -> np.ndarray:
    dtype = storage.dtype if little else storage.dtype.newbyteorder(">")
    needed = storage.numel * dtype.itemsize
    if len(data) < needed:
        raise EOFError(f"storage {storage.key} has {len(data)} of its {needed} bytes (truncated)")
    return np.frombuffer(data, dtype, count=storage.numel).astype(storage.dtype, copy=False)


def _materialise(ref: _TensorRef) -> np.ndarray:
    base = ref.storage.data
    extent = sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True) if n > 0)
    if min(ref.size, default=1) > 0 and ref.offset + extent >= base.size:
        raise ValueError(f"a tensor reaches past its storage {ref.storage.key}")
    strides = tuple(s * base.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(base[ref.offset :], ref.size, strides, writeable=False)
    return np.array(view)  # owns its memory, C order


def _check_flat(path: str, obj, is_tensor, to_numpy) -> dict[str, np.ndarray]:
    """The loaded object as {key: array}: it must be a dict of tensors (a state dict)."""
    if not isinstance(obj, dict):
        raise UserError(f"--file={path} holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not is_tensor(value):
            raise UserError(
                f"--file={path}: {key!r} is a {type(value).__name__}, not a tensor: a state "
                "dict (model.state_dict()) is a dict of tensors"
            )
    return {str(k): to_numpy(v) for k, v in obj.items()}


def _first_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


# --- Writing (no torch needed) --------------------------------------------------------------


def write_pth(path: str, state_dict: dict[str, np.ndarray], *, legacy: bool = False) -> None:
    """Save {key: array} as torch.save(state_dict) would: the zip format, or the legacy one.
    Each array gets its own storage, keyed "0", "1", ... in order."""
    arrays = {k: np.array(v, order="C", copy=None) for k, v in state_dict.items()}
    for key, array in arrays.items():
        if array.dtype not in _STORAGE_NAMES:
            raise ValueError(f"{key}: no torch storage holds {array.dtype}")
    keys = {name: str(i) for i, name in enumerate(arrays)}
    data_pickle = _state_dict_pickle(arrays, keys, legacy=legacy)
    if legacy:
        _write_legacy(path, arrays, keys, data_pickle)
    else:
        _write_zip(path, arrays, keys, data_pickle)


def _write_zip(path, arrays, keys, data_pickle) -> None:
    stem = os.path.splitext(os.path.basename(path))[0] or "archive"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{stem}/data.pkl", data_pickle)
        archive.writestr(f"{stem}/byteorder", "little")
        for name, array in arrays.items():
            archive.writestr(f"{stem}/data/{keys[name]}", _little_endian_bytes(array))
        archive.writestr(f"{stem}/version", "3\n")


def _write_legacy(path, arrays, keys, data_pickle) -> None:
    sys_info = {
        "protocol_version": LEGACY_PROTOCOL_VERSION,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    by_key = {keys[name]: array for name, array in arrays.items()}
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, sys_info):
            pickle.dump(header, f, protocol=2)
        f.write(data_pickle)
        ordered = sorted(by_key)  # torch writes the storages in sorted key order
        pickle.dump(ordered, f, protocol=2)
        for key in ordered:
            f.write(struct.pack("<q", by_key[key].size))
            f.write(_little_endian_bytes(by_key[key]))


def _little_endian_bytes(array: np.ndarray) -> bytes:
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


class _Opcodes:
    """Protocol-2 pickle opcodes, written by hand: pickle itself would have to import torch
    to name torch's globals."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def op(self, code: bytes):
        self.out += code

    def global_(self, module: str, name: str):
        self.out += b"c" + f"{module}\n{name}\n".encode()

    def text(self, value: str):
        encoded = value.encode()
        self.out += b"X" + struct.pack("<I", len(encoded)) + encoded

    def integer(self, value: int):
        if -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)  # BININT
        else:
            encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(encoded)]) + encoded  # LONG1

    def int_tuple(self, values):
        self.op(b"(")
        for v in values:
            self.integer(int(v))
        self.op(b"t")

    def empty_ordered_dict(self):
        self.global_("collections", "OrderedDict")
        self.op(b")R")  # EMPTY_TUPLE, REDUCE


def _state_dict_pickle(arrays: dict[str, np.ndarray], keys: dict[str, str], *, legacy: bool):
    """OrderedDict(key -> _rebuild_tensor_v2(storage, 0, shape, strides, False, {})), with
    each storage a persistent id, as torch.save pickles a state dict."""
    p = _Opcodes()
    p.empty_ordered_dict()
    p.op(b"(")  # MARK: the items
    for name, array in arrays.items():
        p.text(name)
        p.global_("torch._utils", "_rebuild_tensor_v2")
        p.op(b"(")  # MARK: the arguments
        p.op(b"(")  # MARK: the persistent id
        p.text("storage")
        p.global_("torch", _STORAGE_NAMES[array.dtype])
        p.text(keys[name])
        p.text("cpu")
        p.integer(array.size)
        if legacy:
            p.op(b"N")  # no view
        p.op(b"t")
        p.op(b"Q")  # BINPERSID
        p.integer(0)  # storage offset
        p.int_tuple(array.shape)
        p.int_tuple(s // array.itemsize for s in array.strides)
        p.op(b"\x89")  # requires_grad=False
        p.empty_ordered_dict()  # backward hooks
        p.op(b"t")
        p.op(b"R")
    p.op(b"u.")  # SETITEMS, STOP
    return bytes(p.out)
