"""Copy a training run's parts into the package, its tensors stored as fp16 (half the bytes in git).

    python scripts/store_parts.py /tmp/run/parts attanchor_export/load/tiny_scenes_parts

Training writes fp32; the committed copy is fp16 and is widened back to fp32 when the checkpoint is
assembled, so every figure measured on the alias is measured on exactly these stored weights. The
peft README the adapter save writes is left out; MODEL_CARD.md in DST is kept.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file, save_file

    for rel in ("vision_projector.safetensors", "lora/adapter_model.safetensors"):
        tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(args.src / rel)).items()}
        (args.dst / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(args.dst / rel))
    for rel in ("training.json", "lora/adapter_config.json"):
        shutil.copy(args.src / rel, args.dst / rel)
    print(f"{args.src} -> {args.dst} (fp16)")


if __name__ == "__main__":
    main()
