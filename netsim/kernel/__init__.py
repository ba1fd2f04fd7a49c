"""Kernel features: what the host kernel offers, what a topology needs, and a runner that
boots a user-mode Linux guest kernel when the host lacks something."""
