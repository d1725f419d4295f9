"""Run diffusers' own DDPM scheduler tests (tag v0.40.0) against ScratchDDPMScheduler, or against DDPMScheduler.

diffusers' ``tests/`` folder is extracted from a local clone with ``git archive`` into a temporary folder (nothing of
it is kept or committed). In the temporary copy of ``tests/schedulers/test_scheduler_ddpm.py`` the one line
``scheduler_classes = (DDPMScheduler,)`` is swapped for our class; then pytest runs that file and this script
prints one line per test (PASS / FAIL), for docs/compat.md.

    python benchmarks/run_diffusers_scheduler_tests.py [--repo /work/.mirror/huggingface+diffusers/repo]
        [--tag v0.40.0] [--scheduler ours|diffusers] [--junit out.xml]

Exit status: 0 when every test passed, 1 otherwise (diffusers' baseline: all pass).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

TEST_FILE = "tests/schedulers/test_scheduler_ddpm.py"
CLASS_LINE = "    scheduler_classes = (DDPMScheduler,)"
SWAPPED = ("    from ddpm_from_scratch import ScratchDDPMScheduler as _Ours  # swapped in by run_diffusers_scheduler_tests\n"
           "    scheduler_classes = (_Ours,)")
DEFAULT_REPO = "/work/.mirror/huggingface+diffusers/repo"


def extract_tests(repo: str, tag: str, dest: Path) -> Path:
    """git archive <tag> tests/ from ``repo`` into dest; returns dest."""
    blob = subprocess.run(["git", "-C", repo, "archive", "--format=tar", tag, "tests"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def swap_scheduler_class(test_file: Path) -> None:
    text = test_file.read_text()
    if text.count(CLASS_LINE) != 1:
        raise SystemExit(f"{test_file}: expected exactly one line {CLASS_LINE.strip()!r}; diffusers' test changed")
    test_file.write_text(text.replace(CLASS_LINE, SWAPPED))


def read_junit(path: Path) -> list[tuple[str, str, str]]:
    """(test name, PASS/FAIL/SKIP, the failure's message) for each test of DDPMSchedulerTest.

    pytest also collects the imported base class SchedulerCommonTest, whose scheduler_classes is empty: those
    cases test nothing and are left out."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if not case.get("classname", "").endswith("DDPMSchedulerTest"):
            continue
        status, why = "PASS", ""
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                status = "FAIL"
                text = (node.get("message") or "") + "\n" + (node.text or "")
                lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("E ") or ln.strip()]
                why = " ".join(ln for ln in lines[:1])[:200]
        if case.find("skipped") is not None:
            status = "SKIP"
        rows.append((case.get("name"), status, why))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=DEFAULT_REPO, help="a (bare) clone of huggingface/diffusers")
    p.add_argument("--tag", default="v0.40.0")
    p.add_argument("--scheduler", choices=("ours", "diffusers"), default="ours")
    p.add_argument("--junit", default=None, help="also keep pytest's junit XML here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="diffusers-tests-") as tmp:
        root = extract_tests(args.repo, args.tag, Path(tmp))
        if args.scheduler == "ours":
            swap_scheduler_class(root / TEST_FILE)
        junit = Path(args.junit) if args.junit else root / "junit.xml"
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = os.pathsep.join([str(root), src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root),
               "-o", "addopts=", f"--junitxml={junit}", str(root / TEST_FILE)]
        subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = read_junit(junit)
    passed = sum(status == "PASS" for _, status, _ in rows)
    print(f"diffusers {args.tag} {TEST_FILE} against {'ScratchDDPMScheduler' if args.scheduler == 'ours' else 'DDPMScheduler'}: "
          f"{passed}/{len(rows)} passed")
    for name, status, why in sorted(rows):
        print(f"{status}  {name}" + (f"  -- {why}" if why else ""))
    return 0 if rows and passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
