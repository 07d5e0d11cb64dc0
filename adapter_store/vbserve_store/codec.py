"""The wire and storage format: one safetensors blob per adapter (never pickle).

Tensors: `indices (S, k)` in the smallest integer dtype that holds h, `weights (S, k-1)`
(the last weight is 1 minus the others) and, unless omitted, `bank (h, b)`. Metadata:
`format`, `format_version`, `config` (JSON, zlib + base64) and `bank_id` (content hash of the bank), so a
receiver that already holds the bank can take a blob without it.

Every file this package writes is canonical (`save_safetensors`): one adapter gives the same
bytes in every process, so a digest of the bytes identifies the adapter.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .adapter import FLOAT_DTYPES, VBLoRAAdapter, bank_id_of, index_dtype_for
from .config import AdapterConfig
from .errors import AdapterFormatError, AdapterTooLargeError, AdapterValidationError, BankNotFoundError
from .untrusted_json import load_untrusted_json

FORMAT = "vbserve-vblora"
FORMAT_VERSION = "1"
BANK_FORMAT = "vbserve-bank"
DEFAULT_MAX_BLOB_BYTES = 64 << 20
MAX_HEADER_BYTES = 1 << 20
MAX_CONFIG_BYTES = 4 << 20

BankResolver = Callable[[str], torch.Tensor | None]


def encode_adapter(adapter: VBLoRAAdapter, *, include_bank: bool = True) -> bytes:
    """Serialize `adapter`; with `include_bank=False` the blob names its bank by id only."""
    cfg = adapter.config
    tensors = {
        "indices": adapter.indices.to(index_dtype_for(cfg.num_vectors)),
        "weights": adapter.weights[:, :-1].contiguous(),
    }
    if include_bank:
        tensors["bank"] = adapter.bank
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": _pack_config(cfg),
        "bank_id": adapter.bank_id,
        "weights_dtype": _dtype_name(adapter.weights.dtype),
    }
    return save_safetensors(tensors, metadata)


def save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors' own file, its JSON header rewritten with sorted keys. safetensors (0.8)
    writes `__metadata__` in the order of a Rust HashMap, random per call (safetensors issue
    #584): 17 of 20 saves of one adapter differed. Tensor data and offsets are kept as
    written (safetensors orders the data by dtype alignment, then name); readers locate
    tensors by those offsets, not by the header's key order."""
    blob = st_save({name: t.contiguous() for name, t in tensors.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(header)) + header + blob[8 + n :]


def decode_adapter(
    blob: bytes,
    *,
    bank_resolver: BankResolver | None = None,
    max_bytes: int = DEFAULT_MAX_BLOB_BYTES,
) -> VBLoRAAdapter:
    """Parse and validate a blob. A blob without its bank needs `bank_resolver(bank_id)`."""
    metadata, tensors = _load(blob, max_bytes, FORMAT)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError("format_version", f"unsupported {metadata.get('format_version')!r}")
    config = AdapterConfig.from_json(load_untrusted_json(_unpack_config(metadata.get("config", "")), "config"))
    unknown = set(tensors) - {"bank", "indices", "weights"}
    if unknown:
        raise AdapterFormatError("tensors", f"unexpected tensors {sorted(unknown)}")
    for name in ("indices", "weights"):
        if name not in tensors:
            raise AdapterFormatError(name, "tensor missing from blob")
    bank_id = metadata.get("bank_id", "")
    bank = tensors.get("bank")
    if bank is None:
        bank = bank_resolver(bank_id) if bank_resolver else None
        if bank is None:
            raise BankNotFoundError("bank_id", f"blob omits its bank and bank {bank_id!r} is not held")
    weights = tensors["weights"]
    if weights.dim() != 2:
        raise AdapterValidationError("weights", f"must be 2-D (S, k-1), got {tuple(weights.shape)}")
    if weights.dtype not in FLOAT_DTYPES:
        raise AdapterValidationError("weights", f"dtype {_dtype_name(weights.dtype)} is not a float dtype")
    weights = torch.cat([weights, (1 - weights.float().sum(-1, keepdim=True)).to(weights.dtype)], dim=-1)
    adapter = VBLoRAAdapter(config, bank, tensors["indices"], weights)
    if bank_id and adapter.bank_id != bank_id:
        raise AdapterValidationError("bank_id", "bank content does not match its declared hash")
    return adapter


def encode_bank(bank: torch.Tensor, bank_id: str | None = None) -> bytes:
    """bank_id: the bank's id where the caller has it (`VBLoRAAdapter.bank_id`), which
    saves hashing the whole bank again."""
    return save_safetensors({"bank": bank}, {"format": BANK_FORMAT, "bank_id": bank_id or bank_id_of(bank)})


def decode_bank(blob: bytes, *, max_bytes: int = DEFAULT_MAX_BLOB_BYTES, verify: bool = True) -> torch.Tensor:
    """verify=False skips hashing the bank against its declared id: for a bank handed to
    `decode_adapter` as resolved, which hashes it anyway (the `VBLoRAAdapter` it builds)
    and refuses it if it is not the bank the blob names."""
    metadata, tensors = _load(blob, max_bytes, BANK_FORMAT)
    bank = tensors.get("bank")
    if bank is None or bank.dim() != 2:
        raise AdapterFormatError("bank", "bank blob must hold one 2-D tensor 'bank'")
    if verify and metadata.get("bank_id") != bank_id_of(bank):
        raise AdapterValidationError("bank_id", "bank content does not match its declared hash")
    return bank


def attach_bank(body: bytes, bank_blob: bytes) -> bytes:
    """The blob `encode_adapter(adapter)` gives, built from what a store keeps of that
    adapter (`encode_adapter(adapter, include_bank=False)` and `encode_bank(adapter.bank)`)
    without decoding or validating it: the tensors are copied as stored and the metadata
    is the body's (it names the bank with or without it), so the bytes are the same."""
    try:
        tensors = {**st_load(body), "bank": st_load(bank_blob)["bank"]}
    except (SafetensorError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise AdapterFormatError("blob", f"stored adapter is not a valid safetensors file ({exc})") from None
    return save_safetensors(tensors, read_metadata(body, len(body)))


def read_metadata(blob: bytes, max_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> dict[str, str]:
    """The safetensors header's `__metadata__`, read without touching tensor data."""
    if len(blob) > max_bytes:
        raise AdapterTooLargeError("blob", f"{len(blob)} bytes exceed the limit of {max_bytes}")
    if len(blob) < 8:
        raise AdapterFormatError("blob", "truncated: shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(blob):
        raise AdapterFormatError("blob", "truncated or lying header length")
    header = load_untrusted_json(blob[8 : 8 + n], "blob")
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterFormatError("blob", "header has no string __metadata__")
    return meta


def _load(blob: bytes, max_bytes: int, fmt: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise AdapterFormatError("blob", "must be bytes")
    blob = bytes(blob)
    metadata = read_metadata(blob, max_bytes)
    if metadata.get("format") != fmt:
        raise AdapterFormatError("format", f"expected {fmt!r}, got {metadata.get('format')!r}")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise AdapterFormatError("blob", f"not a valid safetensors file ({exc})") from None
    return metadata, tensors


def _pack_config(config: AdapterConfig) -> str:
    """Config JSON, zlib-compressed and base64-encoded: the module list (60 names for q,v
    of a 30-layer model) is most of a bank-less blob and compresses about 9x."""
    raw = json.dumps(config.to_json(), separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def _unpack_config(packed: str) -> str:
    """Inverse of `_pack_config`, refusing to inflate past MAX_CONFIG_BYTES (zip bombs)."""
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(base64.b64decode(packed, validate=True), MAX_CONFIG_BYTES)
        if inflater.unconsumed_tail:
            raise AdapterTooLargeError("config", f"inflates past {MAX_CONFIG_BYTES} bytes")
        if not inflater.eof:
            raise AdapterFormatError("config", "compressed config is truncated")
        return raw.decode("utf-8")
    except (binascii.Error, zlib.error, UnicodeDecodeError):
        raise AdapterFormatError("config", "metadata is not base64 zlib-compressed JSON") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
