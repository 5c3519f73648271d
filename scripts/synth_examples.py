"""Draw the contact sheet ``docs/images/synth_examples.png``: 8 synthetic films with their boxes.

    .venv/bin/python scripts/synth_examples.py [--size 512] [--seed 0] [--out docs/images/synth_examples.png]

Top row: four "Lung Opacity" patients (boxes in red); bottom row: "Normal" and
"No Lung Opacity / Not Normal" patients. Each tile is captioned with class, view and finding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pneumodet.data.records import CLASS_NAMES
from pneumodet.data.synth import render_chest, sample_patients

NORMAL, OPACITY, NOT_NORMAL = CLASS_NAMES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/images/synth_examples.png"))
    args = parser.parse_args()

    specs = sample_patients(60, seed=args.seed)
    opacity = [s for s in specs if s.label_class == OPACITY][:4]
    others = [s for s in specs if s.label_class == NORMAL][:1] + [
        next(s for s in specs if s.finding == f) for f in ("line", "nodule", "cardiomegaly")]
    size = args.size
    font = ImageFont.load_default(size=max(10, size // 28))
    sheet = Image.new("RGB", (4 * size, 2 * size))
    for i, spec in enumerate(opacity + others):
        chest = render_chest(spec, size)
        tile = Image.fromarray(chest.image).convert("RGB")
        draw = ImageDraw.Draw(tile)
        for box in chest.boxes:
            draw.rectangle([float(v) for v in box], outline=(255, 40, 40), width=max(1, size // 200))
        caption = f"{spec.label_class}, {spec.view}" + (f", {spec.finding}" if spec.finding else "")
        draw.text((6, size - size // 20), caption, fill=(90, 255, 90), font=font)
        sheet.paste(tile, ((i % 4) * size, (i // 4) * size))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
