"""The adapter object: config + bank + top-k indices + top-k weights, validated once."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .config import AdapterConfig
from .errors import AdapterValidationError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
# Weights are a softmax: they sum to 1 up to the rounding of the dtype they are kept in.
SUM_TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def bank_id_of(bank: torch.Tensor) -> str:
    """Content address of a bank: dtype, shape and bytes."""
    digest = hashlib.sha256(f"{str(bank.dtype).removeprefix('torch.')}:{tuple(bank.shape)}:".encode())
    digest.update(bank.contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256-" + digest.hexdigest()[:40]


def index_dtype_for(num_vectors: int) -> torch.dtype:
    """Smallest unsigned-safe integer dtype that holds indices in [0, num_vectors)."""
    if num_vectors <= 256:
        return torch.uint8
    if num_vectors <= 32768:
        return torch.int16
    return torch.int32


@dataclass(frozen=True, eq=False)
class VBLoRAAdapter:
    """An immutable VB-LoRA adapter.

    config:  shapes and the sub-vector layout (see `AdapterConfig`).
    bank:    `(h, b)` float tensor, the vector bank.
    indices: `(S, k)` integer tensor, bank rows mixed into each sub-vector.
    weights: `(S, k)` float tensor, the mixing weights (each row sums to 1).
    """

    config: AdapterConfig
    bank: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    bank_id: str = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.config
        h, b, k, s = cfg.num_vectors, cfg.vector_length, cfg.topk, cfg.num_subvectors
        _check_tensor("bank", self.bank, (h, b), FLOAT_DTYPES)
        _check_tensor("indices", self.indices, (s, k), INDEX_DTYPES)
        _check_tensor("weights", self.weights, (s, k), FLOAT_DTYPES)
        if not torch.isfinite(self.bank).all():
            raise AdapterValidationError("bank", "contains NaN or Inf")
        idx = self.indices.to(torch.int64)
        if s and (int(idx.min()) < 0 or int(idx.max()) >= h):
            raise AdapterValidationError(
                "indices", f"values must lie in [0, {h}), got [{int(idx.min())}, {int(idx.max())}]"
            )
        w = self.weights.float()
        if not torch.isfinite(w).all():
            raise AdapterValidationError("weights", "contains NaN or Inf")
        tol = SUM_TOLERANCE[self.weights.dtype]
        if s and (float(w.min()) < -tol or float(w.max()) > 1 + tol):
            raise AdapterValidationError("weights", "values must lie in [0, 1]")
        if s and float((w.sum(-1) - 1).abs().max()) > tol:
            raise AdapterValidationError("weights", "each row of top-k weights must sum to 1")
        object.__setattr__(self, "bank", self.bank.detach().cpu().contiguous())
        object.__setattr__(self, "indices", self.indices.detach().cpu().contiguous())
        object.__setattr__(self, "weights", self.weights.detach().cpu().contiguous())
        object.__setattr__(self, "bank_id", bank_id_of(self.bank))

    @classmethod
    def from_logits(cls, config: AdapterConfig, bank: torch.Tensor, logits: torch.Tensor) -> VBLoRAAdapter:
        """Keep the top-k of trained `(S, h)` logits, as PEFT's `save_only_topk_weights` does."""
        top, idx = logits.detach().topk(config.topk, dim=-1)
        return cls(config, bank.detach(), idx.to(index_dtype_for(config.num_vectors)), torch.softmax(top, dim=-1))

    def to(self, dtype: torch.dtype) -> VBLoRAAdapter:
        """A copy with bank and weights in another float dtype (e.g. float16 to store compact)."""
        if dtype not in FLOAT_DTYPES:
            raise AdapterValidationError("dtype", f"unsupported {dtype}")
        w = self.weights.to(dtype)
        # Re-derive the last weight so the stored row still sums to 1 in the new dtype.
        w = torch.cat([w[:, :-1], (1 - w[:, :-1].float().sum(-1, keepdim=True)).to(dtype)], dim=-1)
        return VBLoRAAdapter(self.config, self.bank.to(dtype), self.indices, w)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bank, self.indices, self.weights))


def _check_tensor(name: str, t: object, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise AdapterValidationError(name, "must be a tensor")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise AdapterValidationError(name, f"dtype {str(t.dtype).removeprefix('torch.')} is not one of {allowed}")
    if tuple(t.shape) != shape:
        raise AdapterValidationError(name, f"shape {tuple(t.shape)} != expected {shape}")
