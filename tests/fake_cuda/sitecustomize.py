"""Not a test: a check that the tests run on the CPU on a machine with a GPU. Put on PYTHONPATH, it
makes torch report a CUDA device that is not there, in the test process and in every script a
test starts (Python imports `sitecustomize` at start-up):

    PYTHONPATH=tests/fake_cuda python -m pytest -q -m "not gpu"

A test that resolved `--device auto` to CUDA, or touched CUDA because it is "available", fails.
"""
import torch

torch.cuda.is_available = lambda: True
