"""Batch prediction from the command line (``lmpipe predict``): CSV, JSONL or plain-text lines in,
labels and class probabilities out (entities with character offsets, for a token classifier), with the
exported ONNX model (default) or the PyTorch one.

A text longer than the model's ``max_length`` tokens is read as in training (``base.reading``: its
head, tail, head and tail, or every window with the windows pooled); the output's ``truncated`` column
marks the texts the model did not read whole (never, for a windows model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lmpipe.errors import UserError
from lmpipe.serve.generator import GENERATOR_FILE
from lmpipe.serve.serving import (
    CLASSIFIER_FILE,
    GENERATION_TASK,
    TOKEN_TASK,
    VARIANT_FILES,
    InputError,
    OnnxEntityTagger,
    OnnxTextClassifier,
    check_texts,
    encode_words,
    entities_of,
    words_of,
)

INPUT_TYPES = {".csv": "csv", ".jsonl": "jsonl", ".txt": "txt"}
OUTPUT_TYPES = {".csv", ".jsonl"}


def read_text_file(path: str | Path, text_column: str = "text") -> tuple[list[int], list[str]]:
    """Row numbers (1-based data rows for CSV, line numbers for JSONL and text) and texts; a
    ``UserError`` naming the file and the row for anything that cannot be scored."""
    path = Path(path)
    kind = INPUT_TYPES.get(path.suffix.lower())
    if kind is None:
        raise UserError(
            f"{path}: unsupported input type '{path.suffix}'; use .csv, .jsonl or .txt (one text a line)"
        )
    try:
        raw = path.read_bytes()
        content = raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not valid UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None

    if kind == "txt":
        lines = content.splitlines()
        rows, values = list(range(1, len(lines) + 1)), lines
    elif kind == "csv":
        import io as _io

        try:
            frame = pd.read_csv(_io.StringIO(content), dtype=object, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{path}: not a readable CSV: {first}") from None
        if text_column not in frame.columns:
            known = ", ".join(map(str, frame.columns)) or "none"
            raise UserError(f"{path}: column '{text_column}' not found (columns: {known}); use --text-column")
        rows, values = list(range(1, len(frame) + 1)), frame[text_column].tolist()
    else:
        rows, values = [], []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
            if text_column not in record:
                known = ", ".join(map(str, record)) or "none"
                raise UserError(
                    f"{path}: line {number}: key '{text_column}' not found (keys: {known}); use --text-column"
                )
            rows.append(number)
            values.append(record[text_column])
    if not values:
        raise UserError(f"{path}: no texts to score")
    for row, value in zip(rows, values, strict=True):
        try:
            check_texts([value], first_row=row)
        except InputError as err:
            where = "line" if kind != "csv" else "row"
            raise UserError(f"{path}: {str(err).replace('row', where, 1)}") from None
    return rows, values


def predict_file(
    input_path: str | Path,
    output_path: str | Path,
    model: str | Path,
    backend: str = "onnx",
    variant: str = "fp32",
    text_column: str = "text",
    batch_size: int = 32,
    max_length: int | None = None,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
) -> pd.DataFrame:
    """Score every text of ``input_path`` and write ``output_path`` (.csv or .jsonl) atomically. The onnx
    backend serves the temperature of its export folder; ``temperature`` is the pytorch backend's. A
    text generator's export folder (``fp32/`` and ``int4/``) generates for each text instead."""
    from lmpipe import io

    output_path = Path(output_path)
    if output_path.suffix.lower() not in OUTPUT_TYPES:
        raise UserError(f"--output: {output_path} must end in .csv or .jsonl")
    if batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1, got {batch_size}")
    rows, texts = read_text_file(input_path, text_column)
    model = Path(model)
    if backend == "onnx" and (model / variant / GENERATOR_FILE).is_file():
        return generate_file(rows, texts, output_path, model / variant, max_new_tokens)
    if (
        backend == "onnx"
        and (model / CLASSIFIER_FILE).is_file()
        and not (model / VARIANT_FILES[variant]).is_file()
    ):
        built = [v for v, f in VARIANT_FILES.items() if (model / f).is_file()]
        raise UserError(
            f"--variant: {model} has no {variant} model ({VARIANT_FILES[variant]}); it holds {', '.join(built)} "
            "(the export report's optimize says why an optimised graph was not built)"
        )
    check_servable(model, backend)
    if model_is_tagger(model, backend):
        return tag_file(rows, texts, output_path, model, backend, variant, batch_size, max_length)

    if backend == "onnx":
        if not (model / CLASSIFIER_FILE).is_file():
            raise UserError(
                f"--model: {model} is not an export folder (no {CLASSIFIER_FILE}); run `dvc repro`"
            )
        classifier = OnnxTextClassifier(model, VARIANT_FILES[variant])
        if max_length is not None:
            classifier.max_length = max_length
        tokenizer, limit, labels = classifier.tokenizer, classifier.max_length, classifier.labels
        reading = classifier.reading["mode"]
        chunks = [
            classifier.predict_proba(texts[i : i + batch_size], batch_size)
            for i in tqdm(range(0, len(texts), batch_size), desc="predict (onnx)", unit="batch")
        ]
        proba = np.concatenate(chunks)
    else:
        if not (model / "config.json").is_file():
            raise UserError(f"--model: {model} is not a save_pretrained model folder (no config.json)")
        if max_length is None:
            raise UserError(
                "--max-length: needed with --backend pytorch (use base.max_length from params.yaml)"
            )
        from lmpipe.modeling.encoding import model_reading
        from lmpipe.modeling.inference import predict_logits_model
        from lmpipe.modeling.models import device, load_model, load_tokenizer
        from lmpipe.serve.serving import softmax

        if temperature <= 0:
            raise UserError(f"temperature: must be > 0, got {temperature}")
        tokenizer, limit, loaded = load_tokenizer(model), max_length, load_model(model).to(device())
        reading = model_reading(loaded)["mode"]
        logits, labels = predict_logits_model(
            loaded, tokenizer, texts, max_length, batch_size, "predict (pytorch)"
        )
        proba = softmax(logits / temperature)

    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    # a windows model reads all of every text; the others read max_length tokens of a longer one
    truncated = [n > limit and reading != "windows" for n in lengths]
    frame = pd.DataFrame({"row": rows, "label": [labels[i] for i in proba.argmax(axis=1)]})
    for j, name in enumerate(labels):
        frame[f"p_{name}"] = np.round(proba[:, j], 6)
    frame["truncated"] = truncated

    if output_path.suffix.lower() == ".csv":
        io.write_csv(output_path, frame)
    else:
        records = [
            {
                "row": int(r),
                "label": lab,
                "probabilities": {name: round(float(p), 6) for name, p in zip(labels, probs, strict=True)},
                "truncated": bool(t),
            }
            for r, lab, probs, t in zip(rows, frame["label"], proba, truncated, strict=True)
        ]
        with io.atomic_path(output_path) as tmp:
            tmp.write_text("".join(json.dumps(rec) + "\n" for rec in records), encoding="utf-8")
    return frame


def generate_file(
    rows: list[int], texts: list[str], output_path: Path, folder: Path, max_new_tokens: int | None
) -> pd.DataFrame:
    """Each text's greedy generation by the ONNX Runtime GenAI folder ``folder`` (the served generator):
    row, generation, new_tokens, prompt_tokens, truncated (the input was cut to the prompt's max_length)."""
    from lmpipe import io
    from lmpipe.serve.generator import GenAIGenerator

    generator = GenAIGenerator(folder)
    limit = generator.max_new_tokens_limit
    n = max_new_tokens or generator.max_new_tokens
    if not 1 <= n <= limit:
        raise UserError(
            f"--max-new-tokens: must be from 1 to {limit} (generation.serve_max_new_tokens), got {n}"
        )
    prompts = generator.prompts(texts)
    out = [generator.generate_ids(p, n) for p in tqdm(prompts.ids, desc="generate (onnx)", unit="text")]
    frame = pd.DataFrame(
        {
            "row": rows,
            "generation": [generator.decode(ids) for ids in out],
            "new_tokens": [len(ids) for ids in out],
            "prompt_tokens": [len(p) for p in prompts.ids],
            "truncated": prompts.cut,
        }
    )
    if output_path.suffix.lower() == ".csv":
        io.write_csv(output_path, frame)
    else:
        with io.atomic_path(output_path) as tmp:
            tmp.write_text(frame.to_json(orient="records", lines=True, force_ascii=False), encoding="utf-8")
    return frame


def check_servable(model: Path, backend: str) -> None:
    """A text generator's save_pretrained folder is refused in one line (``lmpipe predict`` runs its
    export, ONNX Runtime GenAI). An export folder that the export stage left a note in instead of a model
    (``reports.not_applicable``) says why."""
    note = model / "NOTE.md"
    if backend == "onnx" and not (model / CLASSIFIER_FILE).is_file() and note.is_file():
        raise UserError(f"--model: {model} holds no served model: {note.read_text(encoding='utf-8').strip()}")
    if backend == "pytorch" and model_task_name(model) == GENERATION_TASK:
        raise UserError(
            f"--model: {model} is a text generator; lmpipe predict runs its export with --backend onnx "
            "(models/export, ONNX Runtime GenAI with a KV cache)"
        )


def model_task_name(model: Path) -> str | None:
    """The task a ``save_pretrained`` folder's config records (``lmpipe_task``), if any."""
    config = model / "config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("lmpipe_task") if config.is_file() else None


def model_is_tagger(model: Path, backend: str) -> bool:
    """Whether ``model`` (an export folder, or a save_pretrained folder for pytorch) is a token classifier."""
    if backend == "onnx":
        info = model / CLASSIFIER_FILE
        return info.is_file() and json.loads(info.read_text(encoding="utf-8")).get("task") == TOKEN_TASK
    config = model / "config.json"
    return (
        config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("lmpipe_task") == TOKEN_TASK
    )


def tag_file(
    rows: list[int],
    texts: list[str],
    output_path: Path,
    model: Path,
    backend: str,
    variant: str,
    batch_size: int,
    max_length: int | None,
) -> pd.DataFrame:
    """``predict_file`` for a token classifier: each text's entities ``{type, start, end, text, score}``
    (character offsets into the text), as the served model gives them; ``truncated`` marks the texts
    whose later words were not read (tagged ``O``)."""
    from lmpipe import io

    words = [words_of(text) for text in texts]
    sentences = [[w for w, _, _ in ws] for ws in words]
    if backend == "onnx":
        tagger = OnnxEntityTagger(model, VARIANT_FILES[variant])
        if max_length is not None:
            tagger.max_length = max_length
        tokenizer, limit = tagger.tokenizer, tagger.max_length
        tags, scores = [], []
        for i in tqdm(range(0, len(texts), batch_size), desc="predict (onnx)", unit="batch"):
            found, proba = tagger.tag_words(sentences[i : i + batch_size], batch_size)
            tags += found
            scores += proba
    else:
        if max_length is None:
            raise UserError(
                "--max-length: needed with --backend pytorch (use base.max_length from params.yaml)"
            )
        from lmpipe import tasks
        from lmpipe.modeling.models import load_tokenizer

        tokenizer, limit = load_tokenizer(model), max_length
        tagged = tasks.get(tasks.TOKEN_CLASSIFICATION).predict(
            str(model), pd.DataFrame({"tokens": sentences}), max_length, batch_size, "predict (pytorch)"
        )
        tags, scores = tagged.predicted, tagged.confidence
    entities = [entities_of(*row) for row in zip(texts, words, tags, scores, strict=True)]
    lengths = [len(ids) for ids in encode_words(tokenizer, sentences, verbose=False)["input_ids"]]
    truncated = [n > limit for n in lengths]
    frame = pd.DataFrame({"row": rows, "entities": [json.dumps(e) for e in entities], "truncated": truncated})
    if output_path.suffix.lower() == ".csv":
        io.write_csv(output_path, frame)
    else:
        records = [
            {"row": int(r), "entities": e, "truncated": bool(c)}
            for r, e, c in zip(rows, entities, truncated, strict=True)
        ]
        with io.atomic_path(output_path) as tmp:
            tmp.write_text("".join(json.dumps(rec) + "\n" for rec in records), encoding="utf-8")
    return frame
