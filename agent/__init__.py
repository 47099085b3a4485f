"""LPMOS live-image agent: inventory, registration, heartbeat, image install, spool.

Installs alone with ``pip install lpmos[agent]`` (psutil and pyudev); every
other import is the standard library or stdlib-only modules of ``lpmos``
(``lpmos.models``, ``lpmos.config``, ``lpmos.metrics``).
"""

AGENT_VERSION = "0.1.0"
