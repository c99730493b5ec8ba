"""Lowering pruned checkpoints to deployment formats (ONNX, GGUF) and the parity checks that validate them."""
