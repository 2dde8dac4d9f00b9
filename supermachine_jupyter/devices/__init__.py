"""Engine-neutral views of a VM's devices: balloon statistics (``balloon``), data volumes
(``volumes``: sparse ext4 files) and host directory mounts (``mounts``: virtio-fs)."""
