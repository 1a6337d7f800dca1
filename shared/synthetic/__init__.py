"""Synthetic fundus photographs with exact ground truth, for tests and the demo.

`generate_fundus` draws a whole fundus (vessel tree, disc and cup, fovea, lesions);
`shared.synthetic.shapes` draws isolated shapes of known width, tortuosity, curvature and
fractal dimension. Never a substitute for real data in benchmarks.
"""

from shared.synthetic.fundus import SyntheticFundus, generate_fundus
from shared.synthetic.lesions import SyntheticLesion
from shared.synthetic.spec import DEMO_LESION_COUNTS, LesionSpec, SyntheticFundusSpec
from shared.synthetic.vessels import VesselSegment

__all__ = [
    "DEMO_LESION_COUNTS",
    "LesionSpec",
    "SyntheticFundus",
    "SyntheticFundusSpec",
    "SyntheticLesion",
    "VesselSegment",
    "generate_fundus",
]
