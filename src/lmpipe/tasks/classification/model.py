"""Text classification's model side (search, train, compress): text datasets and a split's scores."""

from __future__ import annotations

from lmpipe import data


def dataset(tokenizer, frame, label2id, max_length, reading=None, train=False, seed=0):
    from lmpipe.modeling.encoding import frame_dataset

    return frame_dataset(tokenizer, frame, dict(label2id), max_length, reading, train, seed)


def val_outputs(model, tokenizer, frame, max_length, batch_size, desc=None):
    from lmpipe.metrics import classification_metrics
    from lmpipe.modeling.inference import predict_logits_model

    logits, names = predict_logits_model(
        model, tokenizer, frame["text"].tolist(), max_length, batch_size, desc=desc
    )
    from lmpipe.tasks.base import Outputs

    y_true = data.encode_labels(frame["label"], data.model_label2id(names), "the model's labels")
    pred = logits.argmax(axis=1)
    scores = classification_metrics(y_true, pred)
    return Outputs(logits, scores, [names[i] for i in pred], [str(v) for v in frame["label"]])
