"""Every test runs on the same patched runtime as production: import it before anything else."""
import hermes_green.runtime  # noqa: F401  (monkey-patches; must stay the first import)

import pytest  # noqa: E402


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


from tests.redis_support import redis_server, redis_url  # noqa: E402,F401  (fixtures)
