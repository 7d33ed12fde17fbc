import sys
from pathlib import Path

# Tests import helpers from tests/ (tests.region, tests.pg) as a package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One throwaway Postgres cluster for the whole run, for every test that asks.
from tests.pg import pg_cluster  # noqa: E402,F401
