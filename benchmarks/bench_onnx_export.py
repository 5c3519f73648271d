"""ONNX exporters compared: export time, graph nodes and the difference from PyTorch fp32 (docs/ONNX.md).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_onnx_export.py [--size 512] [--encoder resnet50]

A random model (scores spread around 0.5, so that NMS has work) is saved as a checkpoint and exported
through ``pneumodet.inference.export_onnx``: the network with the TorchScript exporter (opset 17), the
network with the dynamo exporter (opset 18), and the network with its post-processing (dynamo, opset 18).
For each: export time, number of graph nodes, the largest absolute difference from PyTorch fp32 over the
outputs (network graphs) or over the detection scores and boxes (post-processed graph, against
``model.detect``), for batches of 1 and 3 in onnxruntime.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from _common import cpu_model, load_average
from pneumodet.inference import export_onnx
from pneumodet.model import ModelConfig, build_model, save_checkpoint

CASES = (("TorchScript, network", {"opset": 17}), ("dynamo, network", {"opset": 18}),
         ("dynamo, with post-processing", {"opset": 18, "postprocess": True}))


def _max_difference(model: torch.nn.Module, path: Path, postprocess: bool, size: int) -> float:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 3):
        images = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            out = model(images)
            if not postprocess:
                expected = [out.cls_logits, out.box_deltas, out.global_logits, out.anchors]
                worst = max(worst, *(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=True)))
                continue
            for i, det in enumerate(model.detect(out)):
                n = int(got[2][i])
                if n != len(det.scores):  # a cut between equal scores: compare what both kept
                    n = min(n, len(det.scores))
                worst = max(worst, float(np.abs(got[1][i][:n] - det.scores[:n].numpy()).max()),
                            float(np.abs(got[0][i][:n] - det.boxes[:n].numpy()).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--encoder", default="resnet50")
    args = parser.parse_args()
    print(f"# {cpu_model()}; load {load_average()}; torch {torch.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; {args.encoder} at {args.size} px")
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=args.encoder, image_size=args.size)).eval()
    with torch.no_grad():
        model.cls_head.logits.weight.normal_(std=0.3)
        model.cls_head.logits.bias.zero_()
        model.box_head.deltas.weight.normal_(std=0.05)
    print("| exporter | export time (s) | nodes | max abs. difference vs PyTorch fp32 |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model.pt"
        save_checkpoint(checkpoint, model, extra={"threshold": 0.5, "image_size": args.size})
        for name, options in CASES:
            start = time.perf_counter()
            exported = export_onnx(checkpoint, Path(tmp) / "model.onnx", **options)
            seconds = time.perf_counter() - start
            nodes = len(onnx.load(str(exported.path)).graph.node)
            worst = _max_difference(model, exported.path, exported.postprocess, args.size)
            print(f"| {name} | {seconds:.1f} | {nodes} | {worst:.1e} |")


if __name__ == "__main__":
    main()
