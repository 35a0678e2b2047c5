"""The adapter contract kit (hermes_green/testing/contract.py) run against every registered
platform that has a fake Driver (new platforms join by registering one), and against two
test-only adapters on the kit's transports: one over HTTP long polling
(tests/fakes/pollchat_adapter.py), one whose keepalive is a WebSocket ping
(tests/fakes/pingchat_adapter.py)."""
import pytest

from hermes_green.testing.contract import contract_cases
from tests.fakes import pingchat, pollchat

CASES = contract_cases() + contract_cases([pollchat.Driver, pingchat.Driver])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adapter_contract(case, tmp_path):
    case.run(tmp_path)
