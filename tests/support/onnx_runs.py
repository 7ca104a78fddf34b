"""A model.onnx run on ONNX Runtime's CPU provider: the logits the export tests compare with PyTorch's."""

from __future__ import annotations

import onnxruntime as ort
import torch


def onnx_logits(path, inputs: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])
