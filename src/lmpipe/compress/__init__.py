"""Making the model smaller and faster: int8, pruning, distillation, and their measures."""
