"""Settings whose plan catalog is the packaged one plus a test's own plans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelmeter.settings import Settings

PACKAGED_PLANS = Path(__file__).resolve().parents[2] / "src/modelmeter/billing/plans.json"


def with_plans(settings: Settings, tmp_path: Path, plans: list[dict[str, Any]], **updates: Any) -> Settings:
    """``settings`` with a plans file (in ``tmp_path``) of the packaged plans and ``plans``, and ``updates``."""
    packaged = json.loads(PACKAGED_PLANS.read_text())
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"plans": packaged["plans"] + plans}))
    return settings.model_copy(update={"plans_file": path, **updates})
