"""Shared assertions of the tests."""

import pytest


def expect_errors(cases, exceptions=(RuntimeError, ValueError, TypeError)):
    """Each `(call, message)`: calling raises one of `exceptions` whose text contains `message`."""
    for call, message in cases:
        with pytest.raises(exceptions) as info:
            call()
        assert message in str(info.value), (message, str(info.value))
