"""Code paths a release switches on for some of its calls.

`enabled(name)` says whether this call takes the new path `name`. In busline the answer
comes from the platform's fault state: a `buggy-release` fault deploys a new version whose
new path runs (and fails) for a share of calls (`busline.fault_agent.Agent.release_bug`).
The call sites read as any feature-flagged code does, because a service's error reports
carry the source lines around the failing line and the local variables of its frames:
nothing there may name a fault.
"""

from __future__ import annotations


def enabled(name: str) -> bool:
    """Whether this call takes the release's new path `name`."""
    from busline import fault_agent

    return fault_agent.agent().release_bug()
