"""Move a fine-tuned miniworld UNet between device calls in a few MB: its float32 bits XOR the shipped world's,
split into byte planes (the unchanged high bytes become zeros) and xz-compressed; and back, bit for bit.

    python tools/weights_delta.py pack RUN_DIR/unet/diffusion_pytorch_model.safetensors OUT.xz
    python tools/weights_delta.py unpack OUT.xz RUN_DIR/unet/diffusion_pytorch_model.safetensors
"""

import json
import lzma
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

BASE = (
    Path(__file__).resolve().parents[1] / "src/dori/assets/miniworld/unet/diffusion_pytorch_model.safetensors"
)


def _xor(a: dict, b: dict) -> dict:
    if a.keys() != b.keys():
        raise SystemExit("the two UNets have different tensors")
    return {k: (a[k].view(np.uint32) ^ b[k].view(np.uint32)).view(np.float32) for k in a}


def main() -> None:
    verb, src, dst = sys.argv[1:4]
    base = load_file(str(BASE))
    if verb == "pack":
        delta = _xor(load_file(src), base)
        flat = np.concatenate([delta[k].reshape(-1).view(np.uint8) for k in sorted(delta)])
        planes = flat.reshape(-1, 4).T.copy()  # byte j of every float together
        head = json.dumps({k: list(delta[k].shape) for k in sorted(delta)}).encode()
        Path(dst).write_bytes(lzma.compress(len(head).to_bytes(8, "little") + head + planes.tobytes()))
    elif verb == "unpack":
        raw = lzma.decompress(Path(src).read_bytes())
        n = int.from_bytes(raw[:8], "little")
        shapes = json.loads(raw[8 : 8 + n])
        flat = np.frombuffer(raw[8 + n :], np.uint8).reshape(4, -1).T.copy().reshape(-1).view(np.float32)
        delta, at = {}, 0
        for k, shape in shapes.items():
            size = int(np.prod(shape))
            delta[k] = flat[at : at + size].reshape(shape)
            at += size
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        save_file(_xor(delta, base), dst)
    else:
        raise SystemExit("usage: weights_delta.py pack|unpack SRC DST")


if __name__ == "__main__":
    main()
