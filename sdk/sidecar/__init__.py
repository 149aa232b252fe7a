"""The sidecar: SPIFFE identity for programs that know nothing of SPIFFE (``tessera sidecar``).

Two commands, one module per idea:

- ``tessera sidecar files`` writes the workload's X509-SVID, key and bundles
  as PEM files at every rotation, all switched at once, then runs a command
  or signals a pid (:mod:`sdk.sidecar.files`, :mod:`sdk.sidecar.svid_files`,
  :mod:`sdk.sidecar.reload`);
- ``tessera sidecar proxy`` puts mTLS in front of a local app and on its way
  out, with the SDK's policy judging every caller in the handshake and, for
  HTTP, every request (:mod:`sdk.sidecar.proxy`, :mod:`sdk.sidecar.config`,
  :mod:`sdk.sidecar.http`, :mod:`sdk.sidecar.http_exchange`).

Both read the Workload API through :mod:`sdk.sidecar.connect` and serve
:mod:`sdk.sidecar.health` with :mod:`sdk.sidecar.metrics`. TLS and policy are
the SDK's own (:mod:`sdk.tls`, :mod:`sdk.policy`).

::

    config = load_proxy_config("proxy.toml")
    with connect_x509_source(None, spiffe_id=config.spiffe_id) as source:
        proxy = Proxy(config, source)
        await proxy.start()
"""

from sdk.sidecar.config import (
    HostPort,
    InboundConfig,
    ListenerProtocol,
    OutboundConfig,
    ProxyConfig,
    load_proxy_config,
)
from sdk.sidecar.connect import connect_x509_source
from sdk.sidecar.errors import HttpError, SidecarConfigError, SidecarError
from sdk.sidecar.files import FilesSidecar
from sdk.sidecar.proxy import Proxy
from sdk.sidecar.svid_files import WrittenSvid, write_svid_files

__all__ = [
    "FilesSidecar",
    "HostPort",
    "HttpError",
    "InboundConfig",
    "ListenerProtocol",
    "OutboundConfig",
    "Proxy",
    "ProxyConfig",
    "SidecarConfigError",
    "SidecarError",
    "WrittenSvid",
    "connect_x509_source",
    "load_proxy_config",
    "write_svid_files",
]
