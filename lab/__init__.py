"""The QEMU network-boot lab (``lab.runner``); see docs/lab.md."""
