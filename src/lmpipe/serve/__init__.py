"""What ships: the ONNX export and its checks, the served model (``serving``, logged with the MLflow
model and free of lmpipe imports), the promotion gate, the model card and ``lmpipe predict``."""
