"""The jupyter_server extension: a REST API over the registry of live VMs.

Enabled on install by ``jupyter-config/jupyter_server_config.d/supermachine_jupyter.json``
(installed into ``etc/jupyter/jupyter_server_config.d/``). The routes, under the server's
base URL, are in :mod:`supermachine_jupyter.jupyter.server.handlers`.
"""

from __future__ import annotations

from .handlers import API_PREFIX, setup_handlers


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "supermachine_jupyter.jupyter.server"}]


def _load_jupyter_server_extension(serverapp) -> None:
    setup_handlers(serverapp.web_app)
    from .. import registry
    serverapp.log.info("supermachine_jupyter: VM registry API at %s (registry: %s)",
                       API_PREFIX, registry.registry_dir())


# The name jupyter_server < 2 looked for.
load_jupyter_server_extension = _load_jupyter_server_extension

__all__ = ["setup_handlers", "API_PREFIX"]
