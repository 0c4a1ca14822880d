"""The README's settings tables say what the code reads: every setting, its default."""

from __future__ import annotations

import pytest

from aggregator.settings import AggregatorSettings
from attribution.settings import AttributionSettings
from attribution.stats_service import StatsSettings
from gateway.config import Settings
from supervisor.settings import NodeSettings
from tests.conftest import ROOT
from webhooks.settings import WebhookSettings


@pytest.mark.parametrize("settings", [Settings, NodeSettings, AggregatorSettings,
                                      AttributionSettings, WebhookSettings, StatsSettings],
                         ids=lambda c: c.__name__)
def test_every_setting_is_in_the_readme_with_its_default(settings) -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [env for env, default, _doc in settings.describe()
               if f"| `{env}` | `{default}` |" not in readme]
    assert missing == [], f"README.md lacks (or has another default for) {missing}"
