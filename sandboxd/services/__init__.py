"""The services layer: what the daemon does with sandboxes, whoever asks.

Owns the registry of sandboxes (``registry``), their deadlines
(``deadlines``, on the one ``scheduler``), the lifecycle (``sandboxes``),
commands (``execs``), keeping in step with the engine (``reconcile``), the
event bus (``eventbus``) and engine health (``health``). It talks to
containers only through ``sandboxd.backend.base`` (the daemon injects the
Docker backend); it must not import ``rpc`` or ``backend.docker``.
"""
