"""Split-learning ControlNet on the wire: bytes per sample for each layout at SD1.5 shapes.

    python bench/split.py                      # 512 px, SD1.5 shapes (4 latent channels, conv_in to 320)

Each layout's batch is encoded by privdiff's codec (header, buffers and MAC: what travels inside the
Curve channel) and divided by the batch size:
- `reference`: what the reference code sends per sample: h, conv_in(z_t), t, the all-zero text context
  (77 x 768) and the label ε, all fp16 (DESIGN.md 3.1);
- `paper`: privdiff's paper mode: the same without the zero context (the server makes it itself);
- `hardened`: z_t instead of conv_in(z_t), h, t, the noisy label.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def layouts(*, resolution: int, batch: int, latent_channels: int = 4, conv_in_channels: int = 320,
            context: tuple[int, int] = (77, 768)) -> dict[str, dict[str, np.ndarray]]:
    side = resolution // 8
    latent = np.zeros((batch, latent_channels, side, side), dtype=np.float16)
    shared = {"h": latent, "t": np.zeros(batch, dtype=np.int64), "label": latent}
    conv_in = np.zeros((batch, conv_in_channels, side, side), dtype=np.float16)
    return {
        "reference": {**shared, "conv_in_z_t": conv_in, "context": np.zeros((batch, *context), dtype=np.float16)},
        "paper": {**shared, "conv_in_z_t": conv_in},
        "hardened": {**shared, "z_t": latent},
    }


def wire_bytes_per_sample(*, resolution: int, batch: int) -> dict[str, float]:
    from privdiff.transport.codec import Message, encode

    out = {}
    for name, tensors in layouts(resolution=resolution, batch=batch).items():
        frames = encode(Message(kind="batch", fields={"batch_id": "0/0"}, tensors=tensors), key=b"k" * 32,
                        session="0" * 32, seq=1)
        out[name] = sum(memoryview(f).nbytes for f in frames) / batch
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    figures = wire_bytes_per_sample(resolution=args.resolution, batch=args.batch)
    print(json.dumps(figures))
    print(f"| layout | bytes per sample ({args.resolution} px) | vs reference |")
    print("| --- | --- | --- |")
    for name, value in figures.items():
        print(f"| {name} | {value:,.0f} | 1/{figures['reference'] / value:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
