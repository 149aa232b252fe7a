"""Code generated from ``workload.proto`` (the SPIFFE Workload API); see ``make proto``.

The messages live in a private descriptor pool, ``POOL``, not in protobuf's
default one. The Workload API's ``.proto`` has no package, so its message
names (``X509SVIDRequest``...) are global; the ``spiffe`` package registers
the same names in the default pool when it is imported, and protobuf refuses
a second file defining them. With a pool of our own both live side by side
in one process, in either import order, and stay identical on the wire.

    >>> from workload_api._proto import workload_pb2
    >>> workload_pb2.JWTSVIDRequest(audience=["db"]).audience[0]
    'db'
"""

from google.protobuf import descriptor_pool, struct_pb2

POOL = descriptor_pool.DescriptorPool()
POOL.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
