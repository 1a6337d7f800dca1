"""`python -m shared.synthetic OUT.png [--seed N] [--lesions]`: an image and OUT.json truth."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from shared.synthetic.fundus import generate_fundus
from shared.synthetic.spec import DEMO_LESION_COUNTS, SyntheticFundusSpec


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.synthetic",
        description="Draw a synthetic fundus (912 px) and write its ground truth beside it.",
    )
    parser.add_argument("out", type=Path, help="image path (.png); the truth goes to .json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lesions", action="store_true", help="add a demo set of DR lesions")
    args = parser.parse_args(argv)

    spec = SyntheticFundusSpec(lesion_counts=DEMO_LESION_COUNTS if args.lesions else {})
    fundus = generate_fundus(spec, seed=args.seed)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(fundus.rgb).save(out)
    truth_path = out.with_suffix(".json")
    truth_path.write_text(json.dumps(fundus.truth(), indent=1) + "\n")
    print(f"wrote {out} and {truth_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
