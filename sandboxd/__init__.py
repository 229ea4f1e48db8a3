"""sandboxd: a host daemon that owns Docker containers used as sandboxes.

This package root only names the version. It must not import anything heavy:
the client library imports ``sandboxd.protocol`` and ``sandboxd.errors``
without pulling in aiodocker or the daemon.
"""

__version__ = "0.1.0"
API_VERSION = 1
