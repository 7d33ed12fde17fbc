from setuptools import find_packages, setup

setup(
    name="simzmq",
    version="0.1.0",
    description="Instant-messaging back end on a ZeroMQ-brokered message bus",
    python_requires=">=3.11",
    packages=find_packages(include=["simzmq", "simzmq.*"]),
    data_files=[("share/simzmq", ["conf/simzmq.toml"])],
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
