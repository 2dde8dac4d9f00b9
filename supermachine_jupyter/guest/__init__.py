"""The guest, seen from the host: its image (``assets``: kernel and initramfs, built from
Debian's sources into the user cache, or prebuilt in a wheel), its serial console (``console``) and the client of
its agent (``agent``: the protocol of ``native/guest/PROTOCOL.md``)."""
