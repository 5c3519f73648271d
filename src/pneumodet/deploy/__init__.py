"""Files for deploying an exported model without pneumodet: :mod:`~pneumodet.deploy.onnx_reference`, the
ONNX reference decoder (numpy, onnxruntime, and pydicom + OpenCV to read DICOMs), meant to be copied."""
