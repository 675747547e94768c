"""The integration tests' scoring set-up (tiny model, LAION V2 head or its stand-in), shared here."""

from tests.integration.conftest import scoring  # noqa: F401 - a fixture, found by pytest by name
