"""Hugging Face PEFT checkpoints in and out (`adapter_config.json` +
`adapter_model.safetensors`): VB-LoRA ones, with or without `save_only_topk_weights`, and
plain LoRA ones (`peft_type` LORA, see `vbserve_store.lora`).

PEFT layouts: `logits_A (r, in/b, h)`, `logits_B (out/b, r, h)`; the top-k files keep the
same leading dims with `k` indices and `k-1` weights. Our canonical sub-vector order is
those leading dims flattened, so import and export are reshapes, never reorderings.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from pathlib import Path

import regex
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from .adapter import VBLoRAAdapter, index_dtype_for
from .codec import DEFAULT_MAX_BLOB_BYTES, save_safetensors
from .config import AdapterConfig, ModuleSpec, check_sizes, is_int
from .errors import AdapterFormatError, AdapterTooLargeError, AdapterValidationError
from .lora import LoRAAdapter, LoRAConfig, check_lora_sizes
from .untrusted_json import load_untrusted_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 64 << 10
# Time all of one config's patterns may take to match its modules: `.*\.(q|v)_proj`
# matches 4096 module names in 41 ms; `(?:(\w)|(\w)|\.)*(?<=\d)` takes 1.1 s on a
# 26-character name with `re`, doubling with each further character.
PATTERN_BUDGET_S = 0.5

# VBLoRAConfig's fields in PEFT 0.21. An unknown field is refused rather than ignored:
# it may change what the checkpoint means.
_KNOWN_FIELDS = {
    "auto_mapping", "base_model_name_or_path", "bias", "exclude_modules", "fan_in_fan_out",
    "inference_mode", "init_logits_std", "init_vector_bank_bound", "layers_pattern",
    "layers_to_transform", "modules_to_save", "num_vectors", "peft_type", "peft_version", "r",
    "revision", "save_only_topk_weights", "target_modules", "task_type", "topk", "vblora_dropout",
    "vector_length",
}  # fmt: skip
_MODULE_KEY = re.compile(r"^base_model\.model\.(.+)\.vblora_logits_([AB])(_topk_indices|_topk_weights)?$")
_BANK_KEY = re.compile(r"^base_model\.vblora_vector_bank(\.[^.]+)?$")


def import_peft(config: object, tensors: dict[str, torch.Tensor]) -> VBLoRAAdapter:
    """Build an adapter from a parsed `adapter_config.json` and the checkpoint's tensors."""
    cfg = _check_peft_config(config)
    r, h, b, k = cfg["r"], cfg["num_vectors"], cfg["vector_length"], cfg["topk"]
    topk_only = bool(cfg.get("save_only_topk_weights", False))
    banks = [name for name in tensors if _BANK_KEY.match(name)]
    if len(banks) != 1:
        raise AdapterFormatError("adapter_model.vblora_vector_bank", f"expected one bank tensor, found {len(banks)}")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name == banks[0]:
            continue
        m = _MODULE_KEY.match(name)
        if not m:
            raise AdapterFormatError("adapter_model", f"unexpected tensor {name!r}")
        parts.setdefault(m.group(1), {})[m.group(2) + (m.group(3) or "")] = t
    _check_targets(cfg, parts)
    wanted = ("A_topk_indices", "A_topk_weights", "B_topk_indices", "B_topk_weights") if topk_only else ("A", "B")
    modules, idx_parts, w_parts = [], [], []
    for module_name, p in parts.items():
        if set(p) != set(wanted):
            raise AdapterFormatError(
                f"adapter_model.{module_name}", f"expected tensors {sorted(wanted)}, found {sorted(p)}"
            )
        first = p[wanted[0]]
        second = p[wanted[2] if topk_only else "B"]
        if first.dim() != 3 or second.dim() != 3 or first.shape[0] != r or second.shape[1] != r:
            raise AdapterValidationError(f"adapter_model.{module_name}", f"shapes do not match r={r}")
        modules.append(ModuleSpec(module_name, first.shape[1] * b, second.shape[0] * b))
        per_matrix = []
        for mat in ("A", "B"):
            if topk_only:
                idx, w = p[f"{mat}_topk_indices"], p[f"{mat}_topk_weights"]
                if idx.shape[-1] != k or w.shape[-1] != k - 1 or idx.shape[:-1] != w.shape[:-1]:
                    raise AdapterValidationError(
                        f"adapter_model.{module_name}.{mat}", f"top-k shapes do not match k={k}"
                    )
                if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    raise AdapterValidationError(f"adapter_model.{module_name}.{mat}", f"weights dtype {w.dtype}")
                w = torch.cat([w, (1 - w.float().sum(-1, keepdim=True)).to(w.dtype)], dim=-1)
            else:
                logits = p[mat]
                if logits.shape[-1] != h or not logits.is_floating_point():
                    raise AdapterValidationError(
                        f"adapter_model.{module_name}.{mat}", f"logits must be float (..., {h})"
                    )
                top, idx = logits.topk(k, dim=-1)
                w = torch.softmax(top, dim=-1)
            per_matrix.append((idx.reshape(-1, k), w.reshape(-1, k)))
        idx_parts.append((module_name, [i for i, _ in per_matrix]))
        w_parts.append((module_name, [w for _, w in per_matrix]))
    adapter_config = AdapterConfig(
        tuple(modules), r=r, vector_length=b, num_vectors=h, topk=k,
        base_model=str(cfg.get("base_model_name_or_path") or ""),
    )  # fmt: skip
    # Concatenate in the config's canonical module order.
    order = {m.name: i for i, m in enumerate(adapter_config.modules)}
    idx_parts.sort(key=lambda p: order[p[0]])
    w_parts.sort(key=lambda p: order[p[0]])
    indices = torch.cat([t for _, ts in idx_parts for t in ts])
    weights = torch.cat([t for _, ts in w_parts for t in ts])
    if indices.is_floating_point():
        raise AdapterValidationError("adapter_model.topk_indices", "indices must be integers")
    index_range_ok = indices.numel() == 0 or (int(indices.min()) >= 0 and int(indices.max()) < h)
    if not index_range_ok:
        raise AdapterValidationError("indices", f"values must lie in [0, {h})")
    return VBLoRAAdapter(adapter_config, tensors[banks[0]], indices.to(index_dtype_for(h)), weights)


def export_peft(adapter: VBLoRAAdapter, *, save_only_topk_weights: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter as PEFT writes it: (adapter_config.json dict, tensors)."""
    cfg = adapter.config
    r, b, k = cfg.r, cfg.vector_length, cfg.topk
    tensors: dict[str, torch.Tensor] = {"base_model.vblora_vector_bank": adapter.bank}
    for sl in cfg.layout:
        m = sl.module
        for mat, start, stop, lead in (
            ("A", sl.a_start, sl.b_start, (r, m.in_features // b)),
            ("B", sl.b_start, sl.end, (m.out_features // b, r)),
        ):
            key = f"base_model.model.{m.name}.vblora_logits_{mat}"
            idx = adapter.indices[start:stop].reshape(*lead, k)
            w = adapter.weights[start:stop].reshape(*lead, k)
            if save_only_topk_weights:
                tensors[key + "_topk_indices"] = idx.contiguous()
                tensors[key + "_topk_weights"] = w[..., :-1].contiguous()
            else:
                # What PEFT itself rebuilds from a top-k checkpoint: log-weights, -inf elsewhere.
                logits = torch.full((*lead, cfg.num_vectors), float("-inf"))
                tensors[key] = logits.scatter(-1, idx.long(), w.float().log())
    config = {
        "peft_type": "VBLORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.base_model or None,
        # Full module names, so PEFT targets exactly these layers and no others.
        "target_modules": [m.name for m in cfg.modules],
        "r": r,
        "num_vectors": cfg.num_vectors,
        "vector_length": b,
        "topk": k,
        "save_only_topk_weights": save_only_topk_weights,
        "vblora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "inference_mode": True,
    }
    return config, tensors


def read_peft_files(
    config_bytes: bytes, weights_bytes: bytes, *, max_bytes: int = DEFAULT_MAX_BLOB_BYTES
) -> VBLoRAAdapter | LoRAAdapter:
    """Import from the two files' raw bytes (an upload): a VB-LoRA or a LoRA checkpoint,
    as its `peft_type` says."""
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise AdapterTooLargeError(CONFIG_NAME, f"exceeds {MAX_CONFIG_BYTES} bytes")
    if len(weights_bytes) > max_bytes:
        raise AdapterTooLargeError(WEIGHTS_NAME, f"{len(weights_bytes)} bytes exceed the limit of {max_bytes}")
    config = load_untrusted_json(config_bytes, CONFIG_NAME)
    try:
        tensors = st_load(bytes(weights_bytes))
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise AdapterFormatError(WEIGHTS_NAME, f"not a valid safetensors file ({exc})") from None
    if isinstance(config, dict) and config.get("peft_type") == "LORA":
        return import_peft_lora(config, tensors)
    return import_peft(config, tensors)


def load_peft_dir(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> VBLoRAAdapter | LoRAAdapter:
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise AdapterFormatError(name, f"missing from {path}")
    if (path / WEIGHTS_NAME).stat().st_size > max_bytes:
        raise AdapterTooLargeError(WEIGHTS_NAME, f"exceeds the limit of {max_bytes} bytes")
    return read_peft_files((path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes(), max_bytes=max_bytes)


def save_peft_dir(adapter: VBLoRAAdapter, path: str | Path, *, save_only_topk_weights: bool = True) -> None:
    config, tensors = export_peft(adapter, save_only_topk_weights=save_only_topk_weights)
    write_checkpoint_dir(path, config, tensors)


def write_checkpoint_dir(path: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a PEFT-style checkpoint directory (also used for the plain-LoRA export)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    (path / WEIGHTS_NAME).write_bytes(save_safetensors(tensors))


def _check_targets(config: dict, module_names: Iterable[str]) -> None:
    """Refuse a checkpoint whose tensors hold a module its config does not target.

    PEFT loads a checkpoint by wrapping the modules of the base model that the config
    targets, then copying the tensors in: it refuses a config that targets none of them
    (NoMatchingPeftModuleError) and drops, with a warning, the tensors of a module it did
    not wrap. We would serve those tensors, so a module with tensors must be targeted. (A
    targeted module without tensors is not refused: PEFT only warns of missing keys then,
    and which layers a short name like `q_proj` reaches depends on the base model.)

    The rule is PEFT's `check_target_module_exists` (0.21): `exclude_modules` first (a
    string is a regex the whole name must match, a list holds names a module's name equals
    or ends with after a dot); then a string `target_modules` is such a regex, and a list
    such names, kept to the layer indices of `layers_to_transform` when it is given. The
    patterns are a client's: they run on `regex` under one time budget (PATTERN_BUDGET_S),
    since `re` has no timeout and holds the GIL while a pattern backtracks, which would
    stall every route of the server.
    """
    deadline = time.monotonic() + PATTERN_BUDGET_S
    targets = _names_or_pattern(config, "target_modules", required=True)
    excluded = _names_or_pattern(config, "exclude_modules")
    layers = config.get("layers_to_transform")
    if not (layers is None or is_int(layers) or (isinstance(layers, list) and all(map(is_int, layers)))):
        raise AdapterValidationError(f"{CONFIG_NAME}.layers_to_transform", "must be a layer index or a list of them")
    layer_patterns = _names_or_pattern(config, "layers_pattern") or None
    if isinstance(layer_patterns, str):
        layer_patterns = [layer_patterns]

    def match(field: str, pattern: str, name: str, *, whole: bool = True) -> regex.Match | None:
        try:
            return (regex.fullmatch if whole else regex.match)(
                pattern, name, timeout=max(deadline - time.monotonic(), 1e-3)
            )
        except regex.error as exc:
            raise AdapterValidationError(f"{CONFIG_NAME}.{field}", f"not a regular expression: {exc}") from None
        except TimeoutError:
            raise AdapterValidationError(
                f"{CONFIG_NAME}.{field}", f"matching the module names took more than {PATTERN_BUDGET_S} s"
            ) from None

    def named(names: list[str], module: str) -> bool:
        return module in names or any(module.endswith(f".{n}") for n in names)

    def layer_index(module: str) -> int | None:
        # PEFT's: the first number after a `layers_pattern` part, or after any part.
        for pattern in layer_patterns or [None]:
            regexp = r".*?\.[^.]*\.(?P<idx>\d+)\." if pattern is None else rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."
            found = match("layers_pattern", regexp, module, whole=False)
            if found:
                return int(found["idx"])
        return None

    def is_excluded(module: str) -> bool:
        if isinstance(excluded, str):
            return match("exclude_modules", excluded, module) is not None
        return excluded is not None and named(excluded, module)

    def is_targeted(module: str) -> bool:
        if isinstance(targets, str):
            return match("target_modules", targets, module) is not None
        if not named(targets, module):
            return False
        if layers is None or layers == []:
            return True
        index = layer_index(module)
        return index is not None and (index == layers if isinstance(layers, int) else index in layers)

    for module in module_names:
        if is_excluded(module) or not is_targeted(module):
            raise AdapterValidationError(
                f"{CONFIG_NAME}.target_modules",
                f"the checkpoint has tensors for {module!r}, which this config does not target "
                "(PEFT would not load them)",
            )


def _names_or_pattern(config: dict, key: str, *, required: bool = False) -> str | list[str] | None:
    """`config[key]` as PEFT reads it: a regex string, or a list of names (None: absent)."""
    value = config.get(key)
    if value is None and not required:
        return None
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise AdapterValidationError(f"{CONFIG_NAME}.{key}", "must be a regular expression or a list of module names")


def _check_peft_config(config: object) -> dict:
    if not isinstance(config, dict):
        raise AdapterFormatError(CONFIG_NAME, "must be a JSON object")
    if config.get("peft_type") != "VBLORA":
        raise AdapterFormatError(
            f"{CONFIG_NAME}.peft_type", f"must be 'VBLORA' or 'LORA', got {config.get('peft_type')!r:.40}"
        )
    unknown = sorted(set(config) - _KNOWN_FIELDS)
    if unknown:
        raise AdapterFormatError(f"{CONFIG_NAME}.{unknown[0]}", "unknown field")
    check_sizes(
        r=config.get("r"),
        vector_length=config.get("vector_length"),
        num_vectors=config.get("num_vectors"),
        topk=config.get("topk"),
        prefix=f"{CONFIG_NAME}.",
    )
    if config.get("bias", "none") != "none":
        raise AdapterValidationError(f"{CONFIG_NAME}.bias", "only 'none' is supported")
    if config.get("modules_to_save"):
        raise AdapterValidationError(f"{CONFIG_NAME}.modules_to_save", "is not supported")
    if config.get("fan_in_fan_out"):
        raise AdapterValidationError(
            f"{CONFIG_NAME}.fan_in_fan_out", "Conv1D (fan_in_fan_out) models are not supported"
        )
    return config


# -- PEFT LoRA checkpoints --------------------------------------------------------------------

# LoraConfig's fields in PEFT 0.21 that change nothing at inference (training-time
# initialisation and dropout, bookkeeping) or that we check below; any other field is
# refused rather than ignored, as for VB-LoRA checkpoints.
_LORA_FIELDS = {
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path",
    "bias", "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config",
    "megatron_config", "megatron_core", "modules_to_save", "monteclora_config", "peft_type", "peft_version",
    "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config", "target_modules",
    "target_parameters", "task_type", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora",
    "use_rslora", "velora_config",
}  # fmt: skip
# Fields that, set, change what the checkpoint computes in ways this server does not
# implement: field -> why it is refused.
_LORA_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) is not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "modules_to_save": "modules_to_save is not supported",
    "fan_in_fan_out": "Conv1D (fan_in_fan_out) models are not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "target_parameters (LoRA on nn.Parameter) is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "use_bdlora": "use_bdlora is not supported",
    "kasa_config": "kasa_config is not supported",
}
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def import_peft_lora(config: dict, tensors: dict[str, torch.Tensor]) -> LoRAAdapter:
    """A LoRA adapter from a parsed PEFT `adapter_config.json` (`peft_type` LORA) and its
    tensors, checked as PEFT would load them (`_check_targets`)."""
    config_name = CONFIG_NAME
    unknown = sorted(set(config) - _LORA_FIELDS)
    if unknown:
        raise AdapterFormatError(f"{config_name}.{unknown[0]}", "unknown field")
    for key, why in _LORA_UNSUPPORTED.items():
        if config.get(key):
            raise AdapterValidationError(f"{config_name}.{key}", why)
    if config.get("bias", "none") != "none":
        raise AdapterValidationError(f"{config_name}.bias", "only 'none' is supported")
    r, alpha, rslora = config.get("r"), config.get("lora_alpha", 8), config.get("use_rslora", False)
    check_lora_sizes(r, alpha, rslora, prefix=f"{config_name}.")
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if not m:
            raise AdapterFormatError("adapter_model", f"unexpected tensor {key[:120]!r}")
        (a if m.group(2) == "A" else b)[m.group(1)] = t
    _check_targets(config, sorted(set(a) | set(b)))
    modules = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            raise AdapterFormatError(f"adapter_model.{name}", "needs both lora_A and lora_B")
        if a[name].dim() != 2 or b[name].dim() != 2:
            raise AdapterValidationError(f"adapter_model.{name}", "lora_A and lora_B must be matrices")
        modules.append(ModuleSpec(name, a[name].shape[1], b[name].shape[0]))
    lora_config = LoRAConfig(
        tuple(modules), r=r, lora_alpha=alpha, use_rslora=rslora,
        base_model=str(config.get("base_model_name_or_path") or ""),
    )  # fmt: skip
    return LoRAAdapter(lora_config, a, b)


def export_peft_lora(adapter: LoRAAdapter) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json dict, tensors) of the PEFT LoRA checkpoint."""
    cfg = adapter.config
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in adapter.matrices(dtype=adapter.a[cfg.modules[0].name].dtype).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.base_model or None,
        "target_modules": [m.name for m in cfg.modules],
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": cfg.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    return config, tensors
