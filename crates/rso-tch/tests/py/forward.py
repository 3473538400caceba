"""Reads an rso checkpoint (safetensors) with PyTorch and prints the model's logits.

Used by tests/pytorch.rs. Needs only torch: the safetensors format (8-byte little-endian header
length, JSON header, raw little-endian data) is parsed with the standard library, so the file is
shown to be readable without the `safetensors` package.

argv: checkpoint, model description (JSON: layers as rso's ModelSpec lists them), input images
(raw little-endian f32, NCHW), batch size. Prints a JSON list of the logits, row-major.
"""
import json
import struct
import sys

import torch
import torch.nn.functional as F


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F32", meta
        start, end = meta["data_offsets"]
        t = torch.frombuffer(bytearray(body[start:end]), dtype=torch.float32)
        out[name] = t.reshape(meta["shape"])
    return out


def main():
    weights = read_safetensors(sys.argv[1])
    spec = json.loads(sys.argv[2])
    with open(sys.argv[3], "rb") as f:
        raw = f.read()
    b = int(sys.argv[4])
    c, h, w = spec["input"]
    x = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(b, c, h, w)
    for layer in spec["layers"]:
        kind = layer["kind"]
        if kind == "conv":
            x = F.conv2d(x, weights[layer["name"] + ".weight"], weights.get(layer["name"] + ".bias"), padding=1)
        elif kind == "relu":
            x = F.relu(x)
        elif kind == "maxpool":
            x = F.max_pool2d(x, 2)
        elif kind == "avgpool":
            x = F.avg_pool2d(x, 2)
        elif kind == "bn":
            n = layer["name"]
            x = F.batch_norm(x, None, None, weights[n + ".gamma"], weights[n + ".beta"], training=True, eps=1e-5)
        elif kind == "gap":
            x = x.mean(dim=(2, 3))
        elif kind == "dense":
            x = F.linear(x.flatten(1), weights[layer["name"] + ".weight"], weights.get(layer["name"] + ".bias"))
        else:
            raise ValueError(kind)
    print(json.dumps(x.flatten().tolist()))


if __name__ == "__main__":
    main()
