"""The Tessera product: the ``tessera`` command's root group and the commands that
span the whole product, above the server (``ca``), the agent (``workload_api``)
and the SDK (``sdk``)::

    tessera init --trust-domain example.org --dir conf   # starter configuration
    tessera up                                           # server, agent and your SVID
    tessera demo                                         # mTLS through sidecars, live
"""

import sdk  # noqa: F401  (first: its filter for the spiffe package's import warning)
