"""A conformance run's results as a human summary, JSON (Autobahn-style) and JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from conformance.verdicts import CaseResult, Verdict


@dataclass
class Report:
    target: str
    """What was tested: the orchestrator's URL, or `broadcaster at ws://...` for --serve."""
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        tally = Counter(r.verdict for r in self.results)
        return {v.value: tally.get(v, 0) for v in Verdict}

    @property
    def failed(self) -> bool:
        return any(r.verdict is Verdict.FAIL for r in self.results)

    def summary(self) -> str:
        width = max((len(r.name) for r in self.results), default=10)
        lines = [f"conformance of {self.target}"]
        for r in self.results:
            lines.append(
                f"  {r.verdict.value:<4}  {r.name:<{width}}  {r.seconds:6.2f} s  {r.detail}"
            )
        counts = ", ".join(f"{n} {v}" for v, n in self.counts().items())
        lines.append(f"{len(self.results)} cases in {self.seconds:.1f} s: {counts}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "cases": {
                r.name: {
                    "ids": list(r.ids),
                    "title": r.title,
                    "verdict": r.verdict.value,
                    "detail": r.detail,
                    "seconds": round(r.seconds, 3),
                }
                for r in self.results
            },
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def to_junit(self) -> ET.ElementTree:
        """One testsuite, one testcase per case: FAIL is a failure, SKIP is skipped, and
        PASS and INFO pass (INFO's detail goes to system-out)."""
        counts = self.counts()
        suites = ET.Element("testsuites", name="stepstream conformance")
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"stepstream conformance of {self.target}",
            tests=str(len(self.results)),
            failures=str(counts[Verdict.FAIL.value]),
            errors="0",
            skipped=str(counts[Verdict.SKIP.value]),
            time=f"{self.seconds:.3f}",
        )
        for r in self.results:
            case = ET.SubElement(
                suite,
                "testcase",
                classname="conformance." + (r.ids[0] if r.ids else "suite"),
                name=r.name,
                time=f"{r.seconds:.3f}",
            )
            if r.verdict is Verdict.FAIL:
                ET.SubElement(case, "failure", message=r.detail[:512], type="FAIL").text = r.detail
            elif r.verdict is Verdict.SKIP:
                ET.SubElement(case, "skipped", message=r.detail[:512])
            ET.SubElement(case, "system-out").text = f"{r.verdict.value}: {r.title}. {r.detail}"
        ET.indent(suites)
        return ET.ElementTree(suites)

    def write_junit(self, path: Path) -> None:
        self.to_junit().write(path, encoding="utf-8", xml_declaration=True)
