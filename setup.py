import json
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_web_library(build_py):
    """Copy the web chat's crypto library (npm packages, `npm ci`) into the
    built package, where simzmq/web finds it without a node_modules."""

    def run(self):
        super().run()
        if self.editable_mode:
            return  # an editable install serves it from node_modules
        lock = json.loads((ROOT / "package-lock.json").read_text())
        if not (ROOT / "node_modules").is_dir():
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ROOT, check=True)
        vendor = Path(self.build_lib) / "simzmq" / "web" / "vendor"
        for key in lock["packages"]:
            if not key.startswith("node_modules/"):
                continue
            name = key[len("node_modules/"):]
            src = ROOT / key
            for rel in ["package.json", *json.loads((src / "package.json").read_text()).get("files", [])]:
                for path in src.glob(rel):
                    if path.is_file() and path.suffix in (".json", ".mjs"):
                        dest = vendor / name / path.relative_to(src)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(path, dest)


setup(
    name="simzmq",
    version="0.1.0",
    description="Instant-messaging back end on a ZeroMQ-brokered message bus",
    python_requires=">=3.11",
    packages=find_packages(include=["simzmq", "simzmq.*"]),
    data_files=[("share/simzmq", ["conf/simzmq.toml"])],
    package_data={"simzmq.web": ["static/*.html", "static/*.css", "static/*.svg", "static/js/*.js"]},
    cmdclass={"build_py": build_py_with_web_library},
    install_requires=[
        "pyzmq>=25",
        "tornado>=6.3",
        "sqlite-utils>=3.35",
        "pynacl>=1.5",
        "click>=8.1",
        "psycopg[binary]>=3.1",
        "prometheus-client>=0.17",
        # The msgpack codec of the client protocol: a C-accelerated, well-kept
        # implementation beats a hand-written one on speed and correctness.
        "msgpack>=1.0",
        # A faster asyncio event loop under the gate (measured 7-19% more frames/s).
        "uvloop>=0.17",
        # CPU time, memory and command lines of processes and the machine's CPU
        # times for `simzmq bench`, portable and tested, instead of parsing /proc.
        "psutil>=5.9",
    ],
    extras_require={
        "test": [
            "pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6.80",
            # The web chat's tests drive the system's Chromium (never a
            # browser of its own; bin/test installs Debian's chromium).
            "playwright>=1.40",
            # A third party's Majordomo v0.2 (18/MDP) client and worker, so the
            # broker's v0.2 is tested against what an outside service author
            # would use, not only against frames we wrote ourselves.
            "majortomo==0.2.0",
            # majortomo 0.2.0 imports six (majortomo/util.py) without declaring it.
            "six>=1.12",
        ],
    },
    entry_points={"console_scripts": ["simzmq = simzmq.cli:main"]},
)
