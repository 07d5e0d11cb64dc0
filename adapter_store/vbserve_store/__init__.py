"""What an adapter (VB-LoRA, or plain LoRA) is and where it lives: format, validation, PEFT
interop, stores.

Imports neither `server` nor `clients`.
"""

from .adapter import VBLoRAAdapter, bank_id_of, index_dtype_for
from .codec import decode_adapter, decode_bank, encode_adapter, encode_bank, read_metadata
from .config import AdapterConfig, ModuleSpec, SubvectorSlice
from .errors import (
    AdapterError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    AdapterValidationError,
    BankNotFoundError,
    IncompatibleBaseModelError,
    QuotaExceededError,
    StoreUnavailableError,
    VersionConflictError,
)
from .lora import LoRAAdapter, LoRAConfig, config_from_json, decode_lora, encode_lora
from .store import AdapterRecord, AdapterStore, RedisAdapterStore, SQLiteAdapterStore, StoreQuota, open_store

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "AdapterRecord",
    "AdapterStore",
    "AdapterTooLargeError",
    "AdapterValidationError",
    "BankNotFoundError",
    "IncompatibleBaseModelError",
    "LoRAAdapter",
    "LoRAConfig",
    "ModuleSpec",
    "QuotaExceededError",
    "RedisAdapterStore",
    "SQLiteAdapterStore",
    "StoreQuota",
    "StoreUnavailableError",
    "SubvectorSlice",
    "VBLoRAAdapter",
    "VersionConflictError",
    "bank_id_of",
    "config_from_json",
    "decode_adapter",
    "decode_bank",
    "decode_lora",
    "encode_adapter",
    "encode_bank",
    "encode_lora",
    "index_dtype_for",
    "open_store",
    "read_metadata",
]
