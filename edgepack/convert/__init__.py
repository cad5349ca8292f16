"""Converters from training frameworks to ONNX; ``registry`` picks one by the input file."""
