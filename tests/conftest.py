"""Shared test settings: hypothesis profiles and small helpers."""

import os

from hypothesis import HealthCheck, settings

# "default" keeps the suite within a few minutes on 2 cores; "thorough" is for a long local run.
settings.register_profile(
    "default", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("LINATTN_HYPOTHESIS_PROFILE", "default"))

