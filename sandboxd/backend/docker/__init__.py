"""The Docker backend: ``sandboxd.backend.base`` implemented on the Docker Engine.

Owns everything Docker-specific: the engine connection (``engine``, the only
importer of aiodocker and aiohttp), the hardened create body
(``containerspec``), exec processes and their tree kill (``processes``,
``demux``, ``proctree``), and stats (``stats``, ``cgroupstats``,
``enginestats``). The services never import it; the daemon injects it.
"""

from sandboxd.backend.docker.backend import DockerBackend

__all__ = ["DockerBackend"]
