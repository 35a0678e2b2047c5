"""The adapter contract kit (hermes_green/testing/contract.py) run against every registered
platform that has a fake Driver, and against two test-only adapters built on the kit's
transports: one over HTTP long polling, one whose keepalive is a WebSocket ping."""
import pytest

from hermes_green.testing.contract import contract_cases

CASES = contract_cases()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adapter_contract(case, tmp_path):
    case.run(tmp_path)
