"""JUnit XML for ``memplan check --junit PATH``: one testcase per recipe, as CI systems display them.

Layout (the de-facto schema read by GitHub Actions reporters, GitLab, Jenkins and Azure DevOps):
``<testsuites><testsuite name tests failures errors skipped time timestamp><testcase classname name
file time>`` with a ``<failure message type>`` for a recipe that does not fit and an ``<error>`` for
an invalid one; ``<system-out>`` carries the verdict and the GPU breakdown in GiB.
"""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from pathlib import Path

from memplan.check import Outcome
from memplan.memory.breakdown import Tier, components
from memplan.report.check_out import plan_summary
from memplan.units import GiB

SUITE = "memplan check"
CLASSNAME = "memplan.check"


def breakdown_text(o: Outcome) -> str:
    """The verdict, the plan and the GPU components (largest first) of one recipe, in GiB."""
    lines = [o.reason]
    if summary := plan_summary(o):
        lines.append(summary)
    if o.estimate is not None:
        rows = sorted(components(o.estimate.rows, Tier.GPU).items(), key=lambda kv: -kv[1])
        lines += [f"  {name:<34} {nbytes / GiB:>10,.2f} GiB" for name, nbytes in rows]
    return "\n".join(lines)


def testcase(o: Outcome) -> ET.Element:
    case = ET.Element("testcase", {"classname": CLASSNAME, "name": o.name, "file": str(o.path),
                                   "time": f"{o.seconds:.3f}"})
    if o.status == "does_not_fit":
        node = ET.SubElement(case, "failure", {"message": o.reason, "type": "DoesNotFit"})
        node.text = breakdown_text(o)
    elif o.status == "error":
        node = ET.SubElement(case, "error", {"message": o.reason, "type": "InvalidRecipe"})
        node.text = o.reason
    out = ET.SubElement(case, "system-out")
    out.text = breakdown_text(o)
    return case


def junit_xml(outcomes: list[Outcome], *, timestamp: dt.datetime | None = None, timings: bool = True) -> str:
    """The JUnit XML document for ``outcomes``; without ``timings`` it has no ``timestamp`` (an optional
    attribute), so that two reports of the same recipes are identical."""
    failures = sum(1 for o in outcomes if o.status == "does_not_fit")
    errors = sum(1 for o in outcomes if o.status == "error")
    seconds = f"{sum(o.seconds for o in outcomes):.3f}"
    stamp = (timestamp or dt.datetime.now(dt.UTC)).replace(microsecond=0).isoformat()
    counts = {"tests": str(len(outcomes)), "failures": str(failures), "errors": str(errors), "time": seconds}
    root = ET.Element("testsuites", {"name": SUITE, **counts})
    when = {"timestamp": stamp} if timings else {}
    suite = ET.SubElement(root, "testsuite", {"name": SUITE, **counts, "skipped": "0", **when})
    suite.extend(testcase(o) for o in outcomes)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(outcomes: list[Outcome], path: str | Path, *, timings: bool = True) -> Path:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(junit_xml(outcomes, timings=timings), encoding="utf-8")
    return p
