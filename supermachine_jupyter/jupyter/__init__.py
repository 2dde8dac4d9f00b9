"""The Jupyter side: the ``%%vm``/``%vm`` magics (``magics``), the registry of running VMs
that every process publishes to (``registry``) and the jupyter_server extension over it
(``server``: REST for the MicroVMs sidebar). The widgets are ``supermachine_jupyter.widgets``."""
