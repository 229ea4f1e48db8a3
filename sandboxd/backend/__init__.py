"""The backend layer: the interface the services use (``base``) and its implementations.

``base`` must not import any implementation; ``docker`` is the only place
that imports aiodocker or aiohttp.
"""
