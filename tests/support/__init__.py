"""What tests share beyond fixtures: the test CA (``pki``). The fixtures that hand it out are
in ``tests/conftest.py``."""
