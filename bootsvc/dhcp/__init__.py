"""The regional node's ProxyDHCP (UDP 67 and 4011) and lab-mode DHCP server.

``settings`` (the flags and their typed record), ``responder`` (one datagram
to at most one reply, no sockets), ``sockets`` (binding, the port guard,
ancillary data), ``service`` (the sockets on the asyncio loop) and
``standalone`` (``python -m bootsvc.dhcp.standalone``: the service alone).
"""
