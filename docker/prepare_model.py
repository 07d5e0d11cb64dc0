"""Load the configured base model once, then exit: on first run this converts the GGUF
and writes the safetensors cache (VBSERVE_MODEL_CACHE_DIR). docker-compose.yml runs it
before the API replicas and workers start, so each of them starts by loading the cached
copy (about a second) instead of waiting on the file lock while one of them converts."""

import logging

from vbserve.model.loader import load_model
from vbserve.settings import Settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
settings = Settings()
loaded = load_model(settings.model, gguf_file=settings.gguf_file, cache_dir=settings.model_cache_dir)
logging.getLogger("vbserve").info("base model %s is ready in %s", loaded.name, settings.model_cache_dir)
