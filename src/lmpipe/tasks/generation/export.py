"""Generation's export: not yet. Serving a causal LM (int8 weights, ONNX Runtime GenAI's model builder, a
streaming ``lmpipe predict``) is the issue after the one that brought this task; until then the export
and compress stages write a one-line note (``Task.supports`` lacks "compress" and "export"), and the
trained model is the ``save_pretrained`` folder in models/model, logged to MLflow by train."""
