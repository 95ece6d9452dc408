"""Not a test: a pytest plugin that checks the tests run on the CPU on a machine with a GPU. It makes
torch report a CUDA device that is not there, in the test process, before conftest.py is read:

    python -m pytest -q -p tests.fake_cuda -m "not gpu"

A test that resolved `--device auto` to CUDA in this process fails. (Scripts the tests start are not
patched: a fake CUDA there breaks torch itself, e.g. its optimisers ask the CUDA stream whether it is
capturing; conftest.py's $DISENTANGLE_AUTO_DEVICE covers them, see
tests/test_devices.py::test_tests_resolve_auto_to_the_cpu_where_cuda_is_reported.)
"""
import torch

torch.cuda.is_available = lambda: True
