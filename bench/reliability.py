"""The reliability report: the hostile-input, fuzzing, fault and abuse suites in their long form,
their counts summed -> bench/results/reliability.json.

    python -m bench.reliability            # the long form (about 15 minutes on 2 cores)
    python -m bench.reliability --short    # the CI form of the same tests, for a quick look

Each test records what it tried and what happened (tests/reliability.py); this script runs
them with RETINAL_RELIABILITY_LONG=1 (more fuzzing examples, more schemathesis cases, more
requests in flight) and adds the counts up per section. The test outcomes are in the report
too: a figure from a failed test is not a figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "reliability.json"
SUITE = (
    "tests/test_hostile_inputs.py",
    "tests/test_fuzz_properties.py",
    "tests/test_openapi_fuzz.py",
    "tests/test_faults.py",
    "tests/test_batches_faults.py",
    "tests/test_abuse.py",
)


def run_suite(folder: Path, long: bool) -> tuple[list[dict], dict[str, int], list[str]]:
    """Run the suite; its records, its outcome counts and the names of failed tests."""
    records, junit = folder / "records.jsonl", folder / "junit.xml"
    env = {**os.environ, "RETINAL_RELIABILITY_RECORD": str(records)}
    env["RETINAL_RELIABILITY_LONG"] = "1" if long else "0"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    subprocess.run([*command, f"--junitxml={junit}", *SUITE], cwd=ROOT, env=env, check=False)
    outcomes: Counter[str] = Counter()
    failed = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        verdict = next((c.tag for c in case if c.tag in {"failure", "error", "skipped"}), "passed")
        outcomes[verdict] += 1
        if verdict in {"failure", "error"}:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    lines = records.read_text().splitlines() if records.exists() else []
    return [json.loads(line) for line in lines], dict(outcomes), failed


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per section: every count summed, and which tests gave it."""
    sections: dict[str, dict] = defaultdict(lambda: {"counts": Counter(), "tests": set()})
    for item in records:
        section = sections[item["section"]]
        section["counts"].update(item["counts"])
        section["tests"].add(item["test"])
    return {
        name: {"counts": dict(section["counts"]), "tests": sorted(section["tests"])}
        for name, section in sorted(sections.items())
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI form; nothing is written")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="retinal-reliability-") as tmp:
        records, outcomes, failed = run_suite(Path(tmp), long=not args.short)
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "form": "short" if args.short else "long",
        "tests": outcomes,
        "failed_tests": failed,
        "sections": summarise(records),
    }
    print(json.dumps(report, indent=2))
    if not args.short:
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
