"""Attestors: how Tessera learns who a node or a workload is.

Node attestors (``attestor.node``) have an agent half that produces evidence and
a server half that checks it. Workload attestors (``attestor.workload``) turn a
caller's pid/uid/gid into selectors such as ``unix:uid:1000``.
"""
