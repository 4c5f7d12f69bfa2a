"""Compiled kernels of ckcore (private: import the public names from ``ckcore``)."""
