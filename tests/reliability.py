"""The reliability suite's figures (issue 10): tests record what they tried and what happened.

`record("inputs", tried=61, crashes=0, ...)` appends one JSON line to the file named by
`RETINAL_RELIABILITY_RECORD`; without it (plain `make test`) nothing is written.
`bench/reliability.py` runs the suite with that file set and with `RETINAL_RELIABILITY_LONG=1`
(the long forms: more fuzzing examples, more repetitions), then sums the lines into
`bench/results/reliability.json`. A test still asserts its own outcome; the record is only
its count of what it did.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LONG = os.environ.get("RETINAL_RELIABILITY_LONG") == "1"


def scaled(short: int, long: int) -> int:
    """A repetition or example count: `short` in CI, `long` in the bench run."""
    return long if LONG else short


def record(section: str, **counts: int) -> None:
    """Add `counts` to `section` of the reliability report (when one is being written)."""
    path = os.environ.get("RETINAL_RELIABILITY_RECORD")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    line = json.dumps({"section": section, "test": test, "counts": counts})
    with Path(path).open("a") as file:
        file.write(line + "\n")
