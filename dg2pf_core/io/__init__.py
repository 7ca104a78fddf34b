"""What goes in and comes out as files and figures: checkpoints read safely and saved, the compact
sparse format, the output directory and model files, the ONNX export and its runtime, serving a written
model, the plots, latency measurement and the size and accuracy metrics. A change to a file format, an
artifact or a measurement belongs here.
"""
