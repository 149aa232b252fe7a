"""What tests share beyond fixtures: the test CA (``pki``) and long-running processes
(``processes``). The fixtures that hand these out are in ``tests/conftest.py``."""
